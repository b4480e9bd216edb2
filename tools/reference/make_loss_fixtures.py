"""Loss and optimiser fixtures from open_clip 3.3 / torch 2.15.

tests/fixtures/losses.reference.safetensors:
  clip/*, siglip/*: L2-normalised image and text features (float64), the raw log scale t (and bias
      b), open_clip's ClipLoss / SigLipLoss value and the gradients w.r.t. features, t and b.
  adamw/*: two parameters, three steps of gradients, torch.optim.AdamW (lr 1e-2, betas 0.9/0.98,
      eps 1e-6, weight decay 0.1 on `w` only) and the parameters after each step.

Run:  .venv/bin/python tools/reference/make_loss_fixtures.py
"""

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from safetensors.torch import save_file

from common import fixture_path


def loss_case(name, loss_fn, with_bias, g):
    img = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    t = torch.tensor(2.1, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    if with_bias:
        loss = loss_fn(img, txt, t.exp(), b)
    else:
        loss = loss_fn(img, txt, t.exp())
    loss.backward()
    out = {
        f"{name}/image": img.detach(), f"{name}/text": txt.detach(), f"{name}/t": t.detach(),
        f"{name}/loss": loss.detach(), f"{name}/grad_image": img.grad, f"{name}/grad_text": txt.grad,
        f"{name}/grad_t": t.grad,
    }
    if with_bias:
        out[f"{name}/b"] = b.detach()
        out[f"{name}/grad_b"] = b.grad
    return out


def adamw_case(g):
    w = torch.randn(3, 4, generator=g).requires_grad_()
    bias = torch.randn(4, generator=g).requires_grad_()
    out = {"adamw/w0": w.detach().clone(), "adamw/b0": bias.detach().clone()}
    opt = torch.optim.AdamW(
        [{"params": [w], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.98), eps=1e-6,
    )
    for k in range(3):
        gw, gb = torch.randn(3, 4, generator=g), torch.randn(4, generator=g)
        w.grad, bias.grad = gw.clone(), gb.clone()
        opt.step()
        out[f"adamw/gw{k}"], out[f"adamw/gb{k}"] = gw, gb
        out[f"adamw/w{k + 1}"], out[f"adamw/b{k + 1}"] = w.detach().clone(), bias.detach().clone()
    return out


def main():
    g = torch.Generator().manual_seed(314)
    tensors = {}
    tensors.update(loss_case("clip", ClipLoss(), False, g))
    tensors.update(loss_case("siglip", SigLipLoss(), True, g))
    tensors.update(adamw_case(g))
    save_file({k: v.contiguous() for k, v in tensors.items()}, fixture_path("losses.reference.safetensors"))
    print({k: tuple(v.shape) for k, v in tensors.items() if k.endswith("loss")},
          tensors["clip/loss"].item(), tensors["siglip/loss"].item())


if __name__ == "__main__":
    main()
