"""How a sentence-transformers loss finds its Trainer, and the losses a Trainer holds.

sentence-transformers gives a loss no handle on its trainer. The trainer moves every loss to the
model's device while it is built (BaseTrainer.prepare_loss), and calls it from compute_loss: in both,
the trainer is a caller on the stack. tests/test_st_parity.py::test_the_loss_finds_its_trainer_and_the_logs_show_the_bank
fails if a sentence-transformers release changes that.
"""
from __future__ import annotations

from transformers import Trainer

from ..core.bank import bank_bytes
from ..core.memory import check_fits
from ..data.validation import check_text_columns
from .lifecycle import ContAccumCallback, resolve_resume

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
    named = root.items() if isinstance(root, dict) else [("", root)] if root is not None else []
    found = []
    for key, loss in named:
        ours = [node for node in wrappers_of(loss) if hasattr(node, "contaccum_cores")]  # (the ContAccum losses)
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


def attach(trainer: Trainer) -> ContAccumCallback:
    """Equip `trainer` for its ContAccum losses, once: the lifecycle callback, "auto" resolved, and train() that
    resumes from the newest complete checkpoint and tells the lifecycle which one it loaded."""
    existing = next((c for c in trainer.callback_handler.callbacks if isinstance(c, ContAccumCallback)), None)
    if existing is not None and getattr(trainer, "_contaccum_attached", False):
        return existing
    lifecycle = existing or ContAccumCallback(lambda: _cores(trainer))
    if existing is not None:  # an explicit ContAccumBankCallback: moved to where the lifecycle runs
        trainer.callback_handler.callbacks.remove(existing)
        existing._losses = lambda: _cores(trainer)
    lifecycle.attach(trainer)
    args = trainer.args
    processes = args.world_size
    original = trainer.train

    check_text_columns(trainer.train_dataset, "train_dataset")  # before anything reads it: row, column and fix

    def train(resume_from_checkpoint=None, **kwargs):
        for name, loss in contaccum_losses(trainer.loss):
            gathered = processes if loss.gather_across_devices else 1
            loss.pairs_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * gathered
            loss.name = loss.name if loss.name is not None else name
            _build_banks(trainer, loss)
        resume = resolve_resume(args.output_dir, resume_from_checkpoint)
        lifecycle.resumed_from = resume
        return original(resume_from_checkpoint=resume, **kwargs)

    trainer.train = train  # this trainer only: its own train() runs inside, untouched
    trainer._contaccum_attached = True
    return lifecycle


def _build_banks(trainer, loss) -> None:
    """The banks a resume must restore before the first batch: one per MatryoshkaLoss width, else the model's."""
    widths = [dims for wrapper in wrappers_around(trainer.loss, loss) if (dims := getattr(
        wrapper, "matryoshka_dims", None))]
    dims = list(widths[0]) if widths else [loss._full_width()]
    for width in dims:
        core = loss.bank_for(int(width))
        check_fits(bank_bytes(core.bank.size, int(width)), trainer.args.device,
                   f"memory_bank_size={core.bank.size} (vectors of width {width})")
    if widths and (loss._settings.bank_refresh_steps or loss._settings.bank_drift_probe):
        raise ValueError("bank_refresh_steps and bank_drift_probe re-encode texts with the model, which a "
                         "MatryoshkaLoss or AdaptiveLayerLoss patches between calls: set both to 0 with these wrappers")


def _cores(trainer) -> dict:
    cores = {}
    for _, loss in contaccum_losses(getattr(trainer, "loss", None)):
        cores.update(loss.contaccum_cores())
    return cores
