"""Tiny models and tokenizers built offline: a character tokenizer, BERT/decoder configs, saved base models."""
import string

import torch


def make_tokenizer(tmp_path):
    """A tiny character-level WordPiece tokenizer: any lowercase text tokenises, no download."""
    from transformers import BertTokenizerFast

    chars = list(string.ascii_lowercase + string.digits)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + list(".,()'-")
    # transformers 5 reads a vocab dict (given a vocab_file it kept only the 5 special tokens and
    # turned every word into [UNK]); older releases read the file
    try:
        tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    except TypeError:
        path = tmp_path / "vocab.txt"
        path.write_text("\n".join(vocab))
        tokenizer = BertTokenizerFast(vocab_file=str(path), do_lower_case=True)
    assert tokenizer.tokenize("ab1") == ["a", "##b", "##1"], "the test tokenizer must see characters"
    return tokenizer


def tiny_bert_config(vocab_size=100, dropout=0.0):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout)


def tiny_model(shared=True, pooling="mean", normalize=False, seed=0, dropout=0.0):
    from hf_contaccum import BiEncoder

    torch.manual_seed(seed)
    return BiEncoder.from_encoder_config(tiny_bert_config(dropout=dropout), shared=shared, pooling=pooling,
                                         normalize=normalize)


def make_decoder_tokenizer():
    """The same characters as make_tokenizer, the way decoder tokenizers come: a BOS token in front, no EOS at
    the end, no pad token (BiEncoder.from_encoder then pads with EOS, and append_eos adds it)."""
    import copy

    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(make_tokenizer(None)._tokenizer)
    backend.post_processor = TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 2)])
    backend.no_padding()
    backend.no_truncation()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[CLS]", eos_token="[SEP]", unk_token="[UNK]")


def tiny_decoder_config(family="llama"):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    kwargs = {"vocab_size": 100, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64,
              "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 3}
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family](**kwargs)


def saved_base_model(path, config, tokenizer, seed=0):
    """A randomly initialised transformers model and its tokenizer in a folder, as from_encoder expects."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
