"""Tiny checkpoints written on the spot: nothing is downloaded, the weights are random, and the
tokenizer is trained here, so the local backends' tests run anywhere."""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The kernel runs the code and returns the output.",
    "import pandas as pd\ndf = pd.read_csv('data.csv')\nprint(df.describe())",
    "Thought: I should plot the data. Action: code_interpreter Action Input: plt.plot(x, y)",
    "Observation: the figure was saved. Final Answer: the trend is rising.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
] * 4
PROMPT = "<|im_start|>user\nplot the data<|im_end|>\n<|im_start|>assistant\n"  # as the ReAct format writes it


def write_tiny_qwen2(folder: Path) -> Path:
    """A byte-level BPE tokenizer trained here, with ChatML specials and template, and a 2-layer
    Qwen2 model with random weights, saved as a normal checkpoint folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, ))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(folder)

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         initializer_range=0.5,  # a livelier random model: varied text, not one token repeated
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # keep greedy decoding away from the end tokens so outputs run long
        for t in SPECIALS:
            model.lm_head.weight[tok.convert_tokens_to_ids(t)] = 0
    model.save_pretrained(folder)
    return folder
