"""Independent, literal implementations used as references by the tests."""
import torch
import torch.nn.functional as F


def naive_contaccum_loss(q, p, hn, bq, bp, bhn, temperature=1.0, keys=None, cos=False, bank_weight=1.0):
    """Paper eq. 5-7 written out: one (n+m) x (cols) score matrix, bank entries detached.

    bank_weight w: each banked column enters every softmax w times (weights in the sum, not a logit
    shift), each banked row weighs w in the weighted mean over rows.

    q, p: (n, d) current; hn: (n, H, d) or None; bq, bp: (m, d) bank; bhn: (m, Hb, d) or None.
    keys (optional): dict with 'p' (n,), 'hn' (n,H), 'bp' (m,), 'bhn' (m,Hb) for false-negative masks.
    """
    norm = (lambda x: F.normalize(x, dim=-1)) if cos else (lambda x: x)
    q, p, bq, bp = norm(q), norm(p), norm(bq).detach(), norm(bp).detach()
    rows = torch.cat([q, bq])
    cols = [p]
    kcols = [keys["p"]] if keys else []
    if hn is not None:
        cols.append(norm(hn).reshape(-1, q.shape[1]))
        kcols += [keys["hn"].reshape(-1)] if keys else []
    cols.append(bp)
    kcols += [keys["bp"]] if keys else []
    if bhn is not None:
        cols.append(norm(bhn).detach().reshape(-1, q.shape[1]))
        kcols += [keys["bhn"].reshape(-1)] if keys else []
    cols = torch.cat(cols)
    n, m = q.shape[0], bq.shape[0]
    n_cur_cols = n * (1 + (hn.shape[1] if hn is not None else 0))
    targets = torch.cat([torch.arange(n), n_cur_cols + torch.arange(m)]).to(q.device)
    S = rows @ cols.T / temperature
    if keys:
        kc = torch.cat(kcols)
        same = kc[None] == kc[targets][:, None]
        same[torch.arange(n + m, device=q.device), targets] = False
        S = S.masked_fill(same, float("-inf"))
    if bank_weight == 1.0:
        return F.cross_entropy(S, targets)
    column_w = torch.cat([torch.ones(n_cur_cols), torch.full((cols.shape[0] - n_cur_cols,), bank_weight)]).to(q.device)
    probs = torch.exp(S) * column_w  # weighted softmax, computed the long way
    per_row = -torch.log(probs[torch.arange(n + m, device=q.device), targets] / probs.sum(1))
    row_w = torch.cat([torch.ones(n), torch.full((m,), bank_weight)]).to(q.device)
    return (per_row * row_w).sum() / row_w.sum()


def chunked_reference_grads(trainer, model, batch, chunk, seed, k):
    """The gradients GradCache must reproduce: its forward calls (chunk_schedule, paired) run WITH a graph,
    in order, from the same seed (same dropout masks), one naive loss over the batch, one backward."""
    import torch

    from hf_contaccum.data import side_features
    from hf_contaccum.gradcache import chunk_schedule, slice_features

    n, h = batch["hard_negative_keys"].shape
    torch.manual_seed(seed)
    model.train()
    columns = {side: side_features(batch, side) for side in ("query", "passage")}
    names = list(columns)
    calls = chunk_schedule([n, n * (1 + h)], chunk, paired=True)
    reps = [trainer.embed(model, {names[c]: slice_features(columns[names[c]], *rows) for c, rows in call.items()})
            for call in calls]
    q = torch.cat([r["query"] for r in reps if "query" in r])
    passages = torch.cat([r["passage"] for r in reps])
    empty = q.new_zeros(0, q.shape[1])
    (naive_contaccum_loss(q, passages[:n], passages[n:].view(n, h, -1), empty, empty, None) / k).backward()
    return {name: prm.grad.clone() for name, prm in model.named_parameters() if prm.grad is not None}
