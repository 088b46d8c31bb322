"""Tiny seeded models made from a config with transformers (no download):
a Llama with a real byte-level BPE tokenizer, and a sentence-transformers
BERT with a mean-pooling module. Float32: the CPU build of vLLM here has
no bf16 kernels that run on every CPU."""

import json
import os

HEAD_DIM = 64  # vLLM's CPU attention takes 32, 64, 80, 96, 112, 128, ...


def _tokenizer(out_dir, vocab_size=384, **special):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "a model store loads weights fast"], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.save_pretrained(out_dir)
    return fast


def tiny_llama(out_dir, seed=0, layers=2):
    import torch
    import transformers

    fast = _tokenizer(out_dir, bos_token="<s>", eos_token="</s>")
    config = transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=2 * HEAD_DIM, intermediate_size=4 * HEAD_DIM, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).to(torch.float32).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def tiny_sentence_bert(out_dir, seed=0):
    """A BERT saved as a sentence-transformers model: modules.json and a
    1_Pooling/ folder, which vLLM reads for the pooling it applies."""
    import torch
    import transformers

    fast = _tokenizer(out_dir, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]")
    config = transformers.BertConfig(
        vocab_size=len(fast), hidden_size=2 * HEAD_DIM, intermediate_size=4 * HEAD_DIM, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=128, pad_token_id=fast.pad_token_id, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    transformers.BertModel(config, add_pooling_layer=False).to(torch.float32).save_pretrained(
        out_dir, safe_serialization=True
    )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    with open(os.path.join(out_dir, "modules.json"), "w") as f:
        json.dump(modules, f)
    with open(os.path.join(out_dir, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": 128, "do_lower_case": False}, f)
    os.makedirs(os.path.join(out_dir, "1_Pooling"), exist_ok=True)
    with open(os.path.join(out_dir, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 2 * HEAD_DIM, "pooling_mode_cls_token": False,
                   "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                   "pooling_mode_mean_sqrt_len_tokens": False}, f)
    return out_dir
