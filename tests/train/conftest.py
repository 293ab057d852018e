import json

import pytest

from tests.helpers import bilingual_sample_texts


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
