"""BiEncoderConfig: how a BiEncoder's towers are built, pooled, scored, prompted, and which lengths it trained at."""
from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from ..settings import SIMILARITIES

POOLINGS = ("cls", "mean", "last")  # "last": the last attended token (decoder LLM embedders)
SIDES = ("query", "passage")


class BiEncoderConfig(PretrainedConfig):
    model_type = "contaccum_biencoder"

    def __init__(self, encoder_config=None, shared=True, pooling="mean", normalize=False, similarity="dot",
                 prompts=None, peft_config=None, query_max_length=None, passage_max_length=None, **kwargs):
        super().__init__(**kwargs)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        prompts = dict(prompts or {})
        if set(prompts) - set(SIDES) or not all(isinstance(v, str) for v in prompts.values()):
            raise ValueError(f"prompts maps 'query' and/or 'passage' to a text put before every such text, got {prompts!r}")
        if isinstance(encoder_config, PretrainedConfig):
            encoder_config = encoder_config.to_dict()
        self.encoder_config = encoder_config or {}
        self.shared = shared
        self.pooling = pooling
        self.normalize = normalize
        self.similarity = similarity  # how a query and a passage are scored; ContAccumTrainer sets it
        self.prompts = prompts  # {"query": "query: ", "passage": "passage: "}: prepended in training and encoding
        self.peft_config = peft_config  # a PEFT (e.g. LoRA) config as a dict: the towers carry adapters
        # the max lengths training used (ContAccumTrainer sets them): encoding defaults to them
        self.query_max_length, self.passage_max_length = query_max_length, passage_max_length


AutoConfig.register(BiEncoderConfig.model_type, BiEncoderConfig)
