"""sentence-transformers models and batches for the tests: a tiny BERT folder, its SentenceTransformer, features."""
import torch
from helpers.models import make_tokenizer, tiny_bert_config

try:
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
except ImportError:  # sentence-transformers < 6
    from sentence_transformers.models import Pooling, Transformer


def save_encoder(tmp_path, dropout=0.0, seed=0) -> str:
    """A tiny BERT and a character tokenizer saved as one folder: what SentenceTransformer and BiEncoder load."""
    from transformers import BertModel

    path = tmp_path / f"encoder-{dropout}-{seed}"
    torch.manual_seed(seed)
    BertModel(tiny_bert_config(dropout=dropout), add_pooling_layer=False).save_pretrained(path)
    make_tokenizer(tmp_path).save_pretrained(path)
    return str(path)


def st_model(path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(modules=[Transformer(path, max_seq_length=64), Pooling(16, pooling_mode="mean")],
                               device="cpu")


def tokenize(model, texts):
    """sentence-transformers >= 6.2 calls it preprocess (tokenize is deprecated there)."""
    return (getattr(model, "preprocess", None) or model.tokenize)(texts)


def features(model, rows, columns):
    return [tokenize(model, [r[c] for r in rows]) for c in columns]


def grads_of(model, loss_fn, feats, seed=7):
    model.zero_grad()
    torch.manual_seed(seed)
    loss = loss_fn([dict(f) for f in feats], None)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a, b, atol=2e-5, rtol=1e-4):
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=rtol), name  # float32 summation order
