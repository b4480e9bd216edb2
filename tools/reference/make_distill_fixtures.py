"""Momentum-distillation fixtures, written as ALBEF and BLIP write it, in torch 2.15 (float64).

ALBEF `models/model_pretrain.py` (ALBEF.forward, _momentum_update, _dequeue_and_enqueue) and BLIP
`models/blip_retrieval.py` (the `idx`-based targets) are reproduced line for line below, with
ALBEF's learned `temp` written as 1 / exp(t) (vlalign learns CLIP's log scale t).

tests/fixtures/distill.reference.safetensors, for each case `albef` (one-hot diagonal targets) and
`blip` (targets spread over every column with the row's image id):
  {case}/image, {case}/text:        online features [B, D] (L2-normalised)
  {case}/image_m, {case}/text_m:    momentum features [B, D]
  {case}/image_queue, text_queue:   queues [D, Q] (ALBEF's layout: one column per entry)
  {case}/idx, {case}/idx_queue:     image ids [B] and the queue's [Q] (-100 = never written)
  {case}/t, {case}/alpha:           raw log scale, distillation weight
  {case}/targets_i2t, targets_t2i:  the soft targets [B, B + Q]
  {case}/loss, grad_image, grad_text, grad_t
  {case}/queue_image_after, queue_text_after, idx_queue_after, ptr_after: after enqueueing the
      batch's momentum features at ptr {case}/ptr
  ema/param, ema/momentum, ema/after: one `_momentum_update` at momentum 0.995
  qformer/*: the same for BLIP-2's ITC similarity (max over queries / temp; LAVIS), image
      features and queue entries [NQ, D] per image, BLIP's image-id targets

Run:  .venv/bin/python tools/reference/make_distill_fixtures.py
"""

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from common import fixture_path

B, D, Q = 4, 6, 8


def case(name, blip_targets, g):
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)
    image_feat = unit(B, D).requires_grad_()
    text_feat = unit(B, D).requires_grad_()
    image_feat_m, text_feat_m = unit(B, D), unit(B, D)
    # ALBEF: register_buffer("image_queue", torch.randn(embed_dim, queue_size)), normalised on dim 0
    image_queue = F.normalize(torch.randn(D, Q, generator=g, dtype=torch.float64), dim=0)
    text_queue = F.normalize(torch.randn(D, Q, generator=g, dtype=torch.float64), dim=0)
    idx = torch.tensor([3, 5, 3, 9])
    idx_queue = torch.tensor([5, -100, 9, 4, -100, -100, 3, 7])
    # Make one queued text a near-duplicate of a batch text, as a queue of real data would hold.
    text_queue[:, 6] = text_feat_m[0]
    t = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    alpha = 0.4
    temp = 1.0 / t.exp()

    # --- ALBEF.forward, ITA part -----------------------------------------------------------
    with torch.no_grad():
        image_feat_all = torch.cat([image_feat_m.t(), image_queue.clone().detach()], dim=1)
        text_feat_all = torch.cat([text_feat_m.t(), text_queue.clone().detach()], dim=1)
        sim_i2t_m = image_feat_m @ text_feat_all / temp
        sim_t2i_m = text_feat_m @ image_feat_all / temp
        if blip_targets:
            # BLIP blip_retrieval.py: idx_all = cat([idx.t(), idx_queue]); pos_idx = eq(idx, idx_all)
            idx_all = torch.cat([idx.view(1, -1), idx_queue.view(1, -1)], dim=1)
            pos_idx = torch.eq(idx.view(-1, 1), idx_all).double()
            sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
        else:
            sim_targets = torch.zeros(sim_i2t_m.size(), dtype=torch.float64)
            sim_targets.fill_diagonal_(1)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_all / temp
    sim_t2i = text_feat @ image_feat_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    loss_ita = (loss_i2t + loss_t2i) / 2
    loss_ita.backward()

    out = {
        "image": image_feat.detach(), "text": text_feat.detach(),
        "image_m": image_feat_m, "text_m": text_feat_m,
        "image_queue": image_queue.clone(), "text_queue": text_queue.clone(),
        "idx": idx, "idx_queue": idx_queue.clone(),
        "t": t.detach(), "alpha": torch.tensor(alpha, dtype=torch.float64),
        "targets_i2t": sim_i2t_targets, "targets_t2i": sim_t2i_targets,
        "loss": loss_ita.detach(), "grad_image": image_feat.grad, "grad_text": text_feat.grad,
        "grad_t": t.grad,
    }

    # --- _dequeue_and_enqueue (single process: concat_all_gather is the identity) -----------
    ptr = 4  # ALBEF asserts Q % B == 0, so its pointer is always a multiple of B
    image_queue[:, ptr:ptr + B] = image_feat_m.T
    text_queue[:, ptr:ptr + B] = text_feat_m.T
    idx_queue[ptr:ptr + B] = idx
    out.update({
        "ptr": torch.tensor(ptr), "queue_image_after": image_queue, "queue_text_after": text_queue,
        "idx_queue_after": idx_queue, "ptr_after": torch.tensor((ptr + B) % Q),
    })
    return {f"{name}/{k}": v for k, v in out.items()}


def qformer_case(g):
    """BLIP-2's ITC similarity (LAVIS blip2_qformer.py: the max over queries of query feature ·
    text feature, divided by temp) under ALBEF's distillation, with BLIP's image-id targets.
    Queues hold [Q, NQ, D] image entries and [Q, D] text entries (rows, vlalign's layout)."""
    NQ = 3
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)
    image_feats = unit(B, NQ, D).requires_grad_()
    text_feat = unit(B, D).requires_grad_()
    image_feats_m, text_feat_m = unit(B, NQ, D), unit(B, D)
    image_queue, text_queue = unit(Q, NQ, D), unit(Q, D)
    idx = torch.tensor([3, 5, 3, 9])
    idx_queue = torch.tensor([5, -100, 9, 4, -100, -100, 3, 7])
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    alpha = 0.4

    def sims(img_feats, txt_feat, img_all, txt_all, t):
        # LAVIS: sim_q2t = (image_feats.unsqueeze(1) @ text_feat_all.unsqueeze(-1)).squeeze()
        sim_q2t = torch.matmul(img_feats.unsqueeze(1), txt_all.unsqueeze(-1)).squeeze(-1)
        sim_i2t = sim_q2t.max(-1)[0] / t
        # LAVIS: sim_t2q = (text_feat.unsqueeze(1).unsqueeze(1) @ image_feats_all.permute(0, 2, 1))
        sim_t2q = torch.matmul(txt_feat.unsqueeze(1).unsqueeze(1), img_all.permute(0, 2, 1)).squeeze(-2)
        sim_t2i = sim_t2q.max(-1)[0] / t
        return sim_i2t, sim_t2i

    image_all = torch.cat([image_feats_m, image_queue], dim=0)
    text_all = torch.cat([text_feat_m, text_queue], dim=0)
    with torch.no_grad():
        sim_i2t_m, sim_t2i_m = sims(image_feats_m, text_feat_m, image_all, text_all, temp)
        idx_all = torch.cat([idx.view(1, -1), idx_queue.view(1, -1)], dim=1)
        pos_idx = torch.eq(idx.view(-1, 1), idx_all).double()
        sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t, sim_t2i = sims(image_feats, text_feat, image_all, text_all, temp)
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    loss = (loss_i2t + loss_t2i) / 2
    loss.backward()
    out = {
        "image": image_feats.detach(), "text": text_feat.detach(), "image_m": image_feats_m,
        "text_m": text_feat_m, "image_queue": image_queue, "text_queue": text_queue, "idx": idx,
        "idx_queue": idx_queue, "temp": temp.detach(), "alpha": torch.tensor(alpha, dtype=torch.float64),
        "targets_i2t": sim_i2t_targets, "targets_t2i": sim_t2i_targets, "loss": loss.detach(),
        "grad_image": image_feats.grad, "grad_text": text_feat.grad, "grad_temp": temp.grad,
    }
    return {f"qformer/{k}": v for k, v in out.items()}


def ema(g):
    # ALBEF._momentum_update: param_m.data = param_m.data * momentum + param.data * (1 - momentum)
    param = torch.randn(3, 5, generator=g, dtype=torch.float64)
    param_m = torch.randn(3, 5, generator=g, dtype=torch.float64)
    after = param_m * 0.995 + param * (1.0 - 0.995)
    return {"ema/param": param, "ema/momentum": param_m, "ema/after": after}


def main():
    g = torch.Generator().manual_seed(2021)
    tensors = {}
    tensors.update(case("albef", False, g))
    tensors.update(case("blip", True, g))
    tensors.update(ema(g))
    tensors.update(qformer_case(g))
    save_file({k: v.contiguous() for k, v in tensors.items()},
              fixture_path("distill.reference.safetensors"))
    print({k: v.item() for k, v in tensors.items() if k.endswith("/loss")})


if __name__ == "__main__":
    main()
