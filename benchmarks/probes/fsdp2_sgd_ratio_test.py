"""One SGD step (lr 0.5) of FSDP2 on 2 CPU processes (gloo) against one process on the global batch: per parameter,
the projection of the 2-process update on the 1-process update (1.0: the same gradient; 2.0: summed, not averaged).
Run at commit 766f5c8 (before check_fsdp2_gradient_average refused such a group) from tests/ of that checkout:
    python -m pytest -q -s -p no:cacheprovider tests/fsdp2_sgd_ratio_test.py
"""
import json

import test_engines as te
import torch

from hf_contaccum import BiEncoder

init_model = te.init_model


def test_fsdp2_sgd_update_ratio(tmp_path, init_model, tokenizer):
    sgd = {"optim": "sgd", "learning_rate": 0.5, "save_strategy": "no", "max_steps": 1}
    _, params = te._train("fsdp2", tmp_path, tmp_path / "run", init_model, args=sgd)
    trainer = te._single_process(tmp_path / "single", init_model, tokenizer, **sgd)
    init = BiEncoder.from_pretrained(str(init_model)).state_dict()
    ratios, worst = [], 0.0
    for name, value in trainer.model.state_dict().items():
        one, two = (value - init[name]).flatten(), (params[name].float() - init[name]).flatten()
        if one.abs().max() > 1e-6:  # moved in one process (not the frozen pooler, not the key bias)
            ratios.append((two @ one / (one @ one)).item())
            worst = max(worst, (two - one).abs().max().item())
    print(json.dumps({"torch": torch.__version__, "parameters": len(ratios), "ratio_min": round(min(ratios), 6),
                      "ratio_max": round(max(ratios), 6), "max_abs_difference": worst}))
