"""The guide's step 2 ("Format the dataset into a chat template"), adapted only in its paths.

    python scripts/guide_step2.py [OUTPUT_DIR] [DATA_FILE]

Defaults: OUTPUT_DIR = runs/guide/hf_dataset (what assets/configs/guide_prepare.yaml reads),
DATA_FILE = assets/data/sample_sharegpt.jsonl (the shipped Magpie-shaped sample, instead of the hub dataset),
tokenizer = assets/tiny-llama (Llama 3.1 chat template, instead of meta-llama/Llama-3.1-8B-Instruct).

The code below is the guide's as written (indentation restored). Its `get_spans` never terminates on a
conversation that does not end with a closed assistant turn, or whose assistant text contains the end
delimiter (its `end == -1` test can never be true); the sample data is well-formed. `python -m backend.prepare`
with a `chat:` section does the same job in one step without that hazard.
"""

import sys

from datasets import load_dataset
from transformers import AutoTokenizer

output_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/guide/hf_dataset"  # path adapted
data_file = sys.argv[2] if len(sys.argv) > 2 else "assets/data/sample_sharegpt.jsonl"  # path adapted


def apply_chat_template(conversation):
    chatml_conv = []
    for conv in conversation:
        if conv["from"] == "human":
            chatml_conv.append({"role": "user", "content": conv["value"]})
        elif conv["from"] == "gpt":
            chatml_conv.append({"role": "assistant", "content": conv["value"]})
    return tokenizer.apply_chat_template(conversation=chatml_conv, tokenize=False)


def get_spans(text: str, start_delimiter: str, end_delimiter: str):
    spans = []
    start = 0
    while start < len(text):
        end = text.find(start_delimiter, start) + len(start_delimiter)
        if end == -1:
            break
        spans.append([start, end - 1])  # character span indices are inclusive
        start = text.find(end_delimiter, end) + len(end_delimiter)
    return spans


def get_sample_with_spans(sample, start_delimiter, end_delimiter):
    text = apply_chat_template(sample["conversations"])
    spans = get_spans(text, start_delimiter, end_delimiter)
    return {"text": text, "spans": spans}


dataset_name = "Magpie-Align/Magpie-Llama-3.1-Pro-MT-300K-Filtered"
tokenizer_path = "assets/tiny-llama"  # path adapted
dataset = load_dataset("json", data_files=data_file)  # path adapted: the local sample instead of dataset_name
tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
start_delimiter = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
end_delimiter = "<|eot_id|>"
dataset = dataset.map(lambda x: get_sample_with_spans(x, start_delimiter, end_delimiter), num_proc=16)
dataset.save_to_disk(output_dir)  # path adapted (the guide saves chatml_dataset but prepares from hf_dataset)
