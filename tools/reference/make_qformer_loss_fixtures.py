"""Q-Former stage-1 objective fixtures (float64, torch 2.15), written as LAVIS's
blip2_qformer.py `Blip2Qformer.forward` computes them.

tests/fixtures/qformer_losses.reference.safetensors:
  itc/*: normalised query features [B, Q, D] and [CLS] text features [B, D], the temperature;
      sim = max over queries / temp; loss = (CE(sim, arange) + CE(simᵀ, arange)) / 2 with
      label_smoothing 0.1; gradients w.r.t. both features and the temperature.
  itm/*: logits [3B, 2]; CE against [1]·B + [0]·2B (no smoothing); gradient.
  itg/*: logits [B, T, V], ids, mask; labels = ids with padding → −100; CE(logits[:, :-1],
      labels[:, 1:], label_smoothing=0.1); gradient.
  neg/*: a similarity [B, B]; LAVIS (HEAD) hard-negative weights: softmax of sim with the
      diagonal filled with −10000, per image (weights_i2t) and per text (weights_t2i).

Run:  .venv/bin/python tools/reference/make_qformer_loss_fixtures.py
"""

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from common import fixture_path

D64 = torch.float64


def main():
    g = torch.Generator().manual_seed(7)
    out = {}
    # ITC
    b, q, d = 5, 3, 6
    img = F.normalize(torch.randn(b, q, d, generator=g, dtype=D64), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(b, d, generator=g, dtype=D64), dim=-1).requires_grad_()
    temp = torch.tensor(0.07, dtype=D64, requires_grad=True)
    sim_q2t = torch.matmul(img.unsqueeze(1), txt.unsqueeze(-1)).squeeze(-1)  # [B, B, Q]
    sim_i2t = sim_q2t.max(-1).values / temp
    sim_t2q = torch.matmul(txt.unsqueeze(1).unsqueeze(1), img.permute(0, 2, 1)).squeeze(-2)  # [B, B, Q]
    sim_t2i = sim_t2q.max(-1).values / temp
    targets = torch.arange(b)
    loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2
    loss.backward()
    out.update({"itc/image": img.detach(), "itc/text": txt.detach(), "itc/temp": temp.detach(),
                "itc/loss": loss.detach(), "itc/grad_image": img.grad, "itc/grad_text": txt.grad,
                "itc/grad_temp": temp.grad})
    # ITM
    logits = torch.randn(3 * 4, 2, generator=g, dtype=D64).requires_grad_()
    labels = torch.cat([torch.ones(4, dtype=torch.long), torch.zeros(8, dtype=torch.long)])
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    out.update({"itm/logits": logits.detach(), "itm/loss": loss.detach(), "itm/grad_logits": logits.grad})
    # ITG
    bsz, t, v, pad = 3, 6, 9, 0
    ids = torch.randint(1, v, (bsz, t), generator=g)
    mask = torch.ones(bsz, t, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = pad
    logits = torch.randn(bsz, t, v, generator=g, dtype=D64).requires_grad_()
    labels = ids.masked_fill(ids == pad, -100)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), label_smoothing=0.1)
    loss.backward()
    out.update({"itg/logits": logits.detach(), "itg/ids": ids, "itg/mask": mask,
                "itg/loss": loss.detach(), "itg/grad_logits": logits.grad})
    # Hard-negative weights
    sim = torch.randn(b, b, generator=g, dtype=D64) * 3
    s_i2t = sim.clone().fill_diagonal_(-10000)
    s_t2i = sim.t().clone().fill_diagonal_(-10000)
    out.update({"neg/sim": sim, "neg/weights_i2t": F.softmax(s_i2t, dim=1), "neg/weights_t2i": F.softmax(s_t2i, dim=1)})
    save_file({k: x.contiguous() for k, x in out.items()}, fixture_path("qformer_losses.reference.safetensors"))
    print({k: tuple(x.shape) for k, x in out.items()})


if __name__ == "__main__":
    main()
