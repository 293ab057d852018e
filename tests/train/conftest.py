import json

import pytest

from tests.conftest import bilingual_sample_texts

TINY_MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 520, "multiple_of": 16,
              "max_seq_len": 64}


@pytest.fixture(scope="session")
def tiny_run_inputs(small_tokenizer, tmp_path_factory):
    """A saved tokenizer and train/valid corpora for fast training runs."""
    root = tmp_path_factory.mktemp("inputs")
    small_tokenizer.save(str(root / "tokenizer"))
    texts = bilingual_sample_texts()
    documents = [t[i:i + 400] for t in texts for i in range(0, len(t), 400)]
    for name, part in (("train", documents[:-10]), ("valid", documents[-10:])):
        with open(root / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in part)
    return root


def tiny_overrides(inputs, output_dir, **changes) -> list[str]:
    values = {"model_overrides": json.dumps(TINY_MODEL), "tokenizer": str(inputs / "tokenizer"),
              "corpus": str(inputs / "train.jsonl"), "valid_corpus": str(inputs / "valid.jsonl"), "seq_len": 32,
              "batch_size": 4, "steps": 6, "log_interval": 1, "eval_interval": 3, "save_interval": 0,
              "eval_batches": 2, "output_dir": str(output_dir), "progress": False, "lr": 3e-3, "warm_up": 2,
              **changes}
    return [item for name, value in values.items() for item in (f"--{name}", str(value))]
