"""Independent, literal implementations used as references by the tests: the paper's equations, GradCache's
gradients, and training loops written without the library's loss."""
import torch
import torch.nn.functional as F
from helpers.trainers import DEVICE, on_device

from hf_contaccum import ContrastiveCollator


def naive_contaccum_loss(q, p, hn, bq, bp, bhn, temperature=1.0, keys=None, cos=False):
    """Paper eq. 5-7 written out: one (n+m) x (cols) score matrix, bank entries detached.

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
    return F.cross_entropy(S, targets)


def chunked_reference_grads(trainer, model, batch, chunk, seed, k):
    """The gradients GradCache must reproduce: its forward calls (chunk_schedule, paired) run WITH a graph,
    in order, from the same seed (same dropout masks), one naive loss over the batch, one backward."""
    import torch

    from hf_contaccum.core.features import slice_features
    from hf_contaccum.core.gradcache import chunk_schedule, row_ranges
    from hf_contaccum.data.collator import side_features

    n, h = batch["hard_negative_keys"].shape
    torch.manual_seed(seed)
    model.train()
    columns = {side: side_features(batch, side) for side in ("query", "passage")}
    names = list(columns)
    calls = chunk_schedule([row_ranges(columns[c], chunk) for c in names], paired=True)
    reps = [trainer.embed(model, {names[c]: slice_features(columns[names[c]], *rows) for c, rows in call.items()})
            for call in calls]
    q = torch.cat([r["query"] for r in reps if "query" in r])
    passages = torch.cat([r["passage"] for r in reps])
    empty = q.new_zeros(0, q.shape[1])
    (naive_contaccum_loss(q, passages[:n], passages[n:].view(n, h, -1), empty, empty, None) / k).backward()
    return {name: prm.grad.clone() for name, prm in model.named_parameters() if prm.grad is not None}


def manual_gradient_accumulation(model, tokenizer, rows, n_local, k, steps, lr):
    """Plain gradient accumulation with in-batch negatives, written without the library's loss."""
    collate = ContrastiveCollator(tokenizer, 16, 24)
    model.to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batches = [rows[i:i + n_local] for i in range(0, len(rows), n_local)]
    for step in range(steps):
        for micro in batches[step * k:(step + 1) * k]:
            b = on_device(collate(micro))
            out = model(query_input_ids=b["query_input_ids"], query_attention_mask=b["query_attention_mask"],
                        query_token_type_ids=b["query_token_type_ids"], passage_input_ids=b["passage_input_ids"],
                        passage_attention_mask=b["passage_attention_mask"],
                        passage_token_type_ids=b["passage_token_type_ids"])
            scores = out.query_embeddings @ out.passage_embeddings.T
            loss = F.cross_entropy(scores, torch.arange(len(micro), device=DEVICE)) / k
            loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def encode_pair(model, collate, row):
    b = on_device(collate([row]))
    out = model(query_input_ids=b["query_input_ids"], query_attention_mask=b["query_attention_mask"],
                passage_input_ids=b["passage_input_ids"][:1], passage_attention_mask=b["passage_attention_mask"][:1])
    return out.query_embeddings[0], out.passage_embeddings[0]


def manual_contaccum(model, tokenizer, rows, n_local, k, steps, lr, bank_size, num_negatives, refresh=False,
                      drift_probe=0, cos=False):
    """ContAccum written literally: full score matrix over [current; bank] rows and columns each micro-batch.
    refresh: before every optimizer step, every banked pair is encoded again, one pair at a time, from its text.
    drift_probe: before every optimizer step, the run's first `drift_probe` pairs are encoded one at a time without
    dropout, and every banked vector moves by the change of their mean since the last step (then, with cos, back
    onto the sphere). cos: cosine similarity (vectors normalised) instead of dot product."""
    collate = ContrastiveCollator(tokenizer, 16, 24)
    unit = (lambda v: F.normalize(v, dim=-1)) if cos else (lambda v: v)
    model.to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    bank_q, bank_p, bank_rows = [], [], []  # python lists of detached vectors and their rows, oldest first
    batches = [rows[i:i + n_local] for i in range(0, len(rows), n_local)]
    losses, last_means = [], None
    for step in range(steps):
        if drift_probe:
            model.eval()
            with torch.no_grad():
                probe = [[unit(v) for v in encode_pair(model, collate, row)] for row in rows[:drift_probe]]
            model.train()
            means = [torch.stack(vectors).mean(0) for vectors in zip(*probe)]
            if last_means is not None:
                bank_q = [unit(v + means[0] - last_means[0]) for v in bank_q]
                bank_p = [unit(v + means[1] - last_means[1]) for v in bank_p]
            last_means = means
        if refresh and bank_rows:
            with torch.no_grad():
                for i, row in enumerate(bank_rows):
                    bank_q[i], bank_p[i] = encode_pair(model, collate, row)
        for micro in batches[step * k:(step + 1) * k]:
            b = on_device(collate(micro))
            out = model(**{key: b[key] for key in b if key.endswith(("input_ids", "attention_mask", "token_type_ids"))})
            n = len(micro)
            q, passages = unit(out.query_embeddings), unit(out.passage_embeddings)
            p, hn = passages[:n], passages[n:]
            mq = torch.stack(bank_q) if bank_q else q.new_zeros(0, q.shape[1])
            mp = torch.stack(bank_p) if bank_p else q.new_zeros(0, q.shape[1])
            rows_ = torch.cat([q, mq])
            cols = torch.cat([p, hn, mp])
            targets = torch.cat([torch.arange(n), len(p) + len(hn) + torch.arange(len(mq))]).to(DEVICE)
            loss = F.cross_entropy(rows_ @ cols.T, targets)
            losses.append(loss.item())
            (loss / k).backward()
            for i in range(n):
                bank_q.append(q[i].detach())
                bank_p.append(p[i].detach())
                bank_rows.append(micro[i])
            del bank_q[:-bank_size], bank_p[:-bank_size], bank_rows[:-bank_size]
        opt.step()
        opt.zero_grad()
    return model, losses


def naive_extended_loss(q, d, hn, bq, bd, bhn, scale, similarity, directions=("query_to_doc",), partition="joint",
                        hardness_mode=None, strength=0.0):
    """sentence-transformers' MultipleNegativesRankingLoss objective (directions, partition mode, hardness) over
    current AND banked pairs, written out: rows are [current ; banked] pairs, candidates every query and passage,
    banked ones detached; one score matrix per direction, masked as MNRL masks them, one mean over all rows.

    q, d: (n, dim) current queries and positives; hn: (n, H, dim) or None; bq, bd: (m, dim) banked; bhn: (m, Hb,
    dim) or None. similarity: a sentence-transformers function, e.g. cos_sim (applied to the raw vectors)."""
    n, m, dim = q.shape[0], bq.shape[0], q.shape[1]
    device = q.device
    docs, owner, positive = [d, bd.detach()], [torch.arange(n), n + torch.arange(m)], [True] * (n + m)
    if hn is not None:
        docs.append(hn.reshape(-1, dim))
        owner.append(torch.arange(n).repeat_interleave(hn.shape[1]))
        positive += [False] * (n * hn.shape[1])
    if bhn is not None:
        docs.append(bhn.detach().reshape(-1, dim))
        owner.append(n + torch.arange(m).repeat_interleave(bhn.shape[1]))
        positive += [False] * (m * bhn.shape[1])
    docs, owner = torch.cat(docs), torch.cat(owner).to(device)
    positive = torch.tensor(positive, device=device)
    rows_q, rows_d = torch.cat([q, bq.detach()]), torch.cat([d, bd.detach()])
    queries, rows = torch.cat([q, bq.detach()]), torch.arange(n + m, device=device)
    own = owner[None] == rows[:, None]  # (rows, docs): the row's own passages
    matrices = {}
    sim = similarity(rows_q, docs)
    logits = sim * scale
    if hardness_mode is not None and strength > 0:
        penalised = {"in_batch_negatives": ~own, "hard_negatives": own & ~positive[None],
                     "all_negatives": ~(own & positive[None])}[hardness_mode]
        logits = logits + strength * sim.detach() * penalised
    matrices["query_to_doc"] = logits
    self_query = rows[None] == rows[:, None]
    if "query_to_query" in directions:
        matrices["query_to_query"] = (similarity(rows_q, queries) * scale).masked_fill(self_query, float("-inf"))
    if "doc_to_query" in directions:
        matrices["doc_to_query"] = similarity(rows_d, queries) * scale
    if "doc_to_doc" in directions:
        matrices["doc_to_doc"] = (similarity(rows_d, docs) * scale).masked_fill(own, float("-inf"))
    target = matrices["query_to_doc"][rows, rows]  # the row's own positive is docs[row] (current, then banked)
    chosen = [matrices[direction] for direction in directions]
    if partition == "joint":
        log_z = torch.cat(chosen, 1).logsumexp(1)
    else:
        log_z = torch.stack([matrix.logsumexp(1) for matrix in chosen]).mean(0)
    return (log_z - target).mean()


def naive_mining(rows, corpus_texts, encoder, num_negatives=3, range_min=0, range_max=None, max_score=None,
                 min_score=None, absolute_margin=None, relative_margin=None, rescore=None):
    """Hard-negative mining written out with numpy in float64: every query scored against the whole corpus, the
    top range_max + positives + 1 kept as candidates (sentence-transformers' pool), the query and its positives (by
    text) dropped, the filters applied, ranks range_min to range_max, the best num_negatives. Returns {query: [texts
    of its negatives, best first]}. rescore(query, texts) -> scores replaces the model's scores (a cross-encoder)."""
    import numpy as np

    queries = list(dict.fromkeys(r["query"] for r in rows))
    corpus = list(dict.fromkeys(list(corpus_texts) + [r["positive"] for r in rows]))
    positives = {q: [r["positive"] for r in rows if r["query"] == q] for q in queries}
    most = max(len(set(p)) for p in positives.values())
    filtered = any(v is not None for v in (absolute_margin, relative_margin, max_score))
    range_max = range_max if range_max is not None else range_min + num_negatives * (10 if filtered else 1) + most
    q_vectors = encoder.encode_queries(queries).astype(np.float64)
    c_vectors = encoder.encode_passages(corpus).astype(np.float64)
    mined = {}
    for i, query in enumerate(queries):
        scores = c_vectors @ q_vectors[i]
        pool = sorted(range(len(corpus)), key=lambda j: (-scores[j], j))[:range_max + most + 1]
        own = set(positives[query]) | {query}
        candidates = [j for j in pool if corpus[j] not in own]
        positive_scores = [float(c_vectors[corpus.index(p)] @ q_vectors[i]) for p in dict.fromkeys(positives[query])]
        score = {j: float(scores[j]) for j in candidates}
        if rescore is not None:
            score = dict(zip(candidates, rescore(query, [corpus[j] for j in candidates])))
            positive_scores = list(rescore(query, list(dict.fromkeys(positives[query]))))
        lowest = min(positive_scores)
        keep = [j for j in candidates
                if (absolute_margin is None or score[j] + absolute_margin <= lowest)
                and (relative_margin is None or score[j] <= lowest - abs(lowest) * relative_margin)
                and (max_score is None or score[j] <= max_score) and (min_score is None or score[j] >= min_score)]
        keep = sorted(keep, key=lambda j: (-score[j], j))[:range_max][range_min:]
        mined[query] = [corpus[j] for j in keep[:num_negatives]]
    return mined
