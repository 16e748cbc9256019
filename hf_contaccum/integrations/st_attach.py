"""How a sentence-transformers loss finds its Trainer, and the losses a Trainer holds.

sentence-transformers gives a loss no handle on its trainer. The trainer moves every loss to the
model's device while it is built (BaseTrainer.prepare_loss), and calls it from compute_loss: in both,
the trainer is a caller on the stack. test_sentence_transformers.py::test_the_loss_finds_its_trainer
fails if a sentence-transformers release changes that.
"""
from __future__ import annotations

from transformers import Trainer

MAX_DEPTH = 40


def find_trainer(frame) -> Trainer | None:
    """The nearest transformers Trainer among the callers of `frame` (its `self`), or None."""
    for _ in range(MAX_DEPTH):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and hasattr(candidate, "callback_handler"):
            return candidate
        frame = frame.f_back
    return None


def _roots(root) -> list:
    return list(root.values()) if isinstance(root, dict) else [root] if root is not None else []


def wrappers_of(root) -> list:
    """Every loss of `root` (a loss or {name: loss}) along its `.loss` chain (MatryoshkaLoss, AdaptiveLayerLoss and
    other wrappers keep the loss they wrap there), outermost first."""
    found = []
    for node in _roots(root):
        while node is not None:
            found.append(node)
            node = getattr(node, "loss", None)
    return found


def wrappers_around(root, loss) -> list:
    """The wrappers on the way from `root` down to `loss`, outermost first ([] when `loss` is the root)."""
    for node in _roots(root):
        chain = []
        while node is not None and node is not loss:
            chain.append(node)
            node = getattr(node, "loss", None)
        if node is loss:
            return chain
    return []


def contaccum_losses(root) -> list[tuple[str, object]]:
    """[(name, ContAccum loss)] inside a trainer's `loss`: the dataset's key for a loss per dataset, else ""."""
    from .sentence_transformers import ContAccumMultipleNegativesRankingLoss

    named = root.items() if isinstance(root, dict) else [("", root)] if root is not None else []
    found = []
    for key, loss in named:
        ours = [node for node in wrappers_of(loss) if isinstance(node, ContAccumMultipleNegativesRankingLoss)]
        found += [(key if len(ours) == 1 else f"{key}{'_' if key else ''}{i}", node) for i, node in enumerate(ours)]
    return found


def intermediate_layer(model) -> bool:
    """Whether AdaptiveLayerLoss is running the model for one of its earlier layers (its TransformerDecorator on the
    first module, with a layer index): those embeddings are a wrapper's, not the model's, and never banked."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    try:
        first = model[0]
    except (TypeError, IndexError, KeyError):
        return False
    return getattr(getattr(first, "forward", None), "layer_idx", None) is not None
