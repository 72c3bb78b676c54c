"""Draft vocabularies: ranking token counts, the files that carry them, and the head proposing from one."""

import json
from collections import Counter

import pytest
import torch

from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.draft_vocab import (most_frequent, read_draft_vocab, read_token_counts, write_draft_vocab,
                                            write_token_counts)
from jetspec_trt.models.presets import random_models


def test_most_frequent_ranks_by_count_then_id_and_fills_from_id_zero():
    counts = Counter({7: 5, 3: 5, 9: 2, 4: 1})
    assert most_frequent(counts, 2, 10) == ([3, 7], 10 / 13)  # the tie 3 / 7 both fit
    assert most_frequent(counts, 3, 10) == ([3, 7, 9], 12 / 13)
    assert most_frequent(counts, 6, 10) == ([0, 1, 3, 4, 7, 9], 1.0)  # never-counted ids fill up from 0
    with pytest.raises(JetSpecError, match="1..10"):
        most_frequent(counts, 11, 10)
    with pytest.raises(JetSpecError, match="outside"):
        most_frequent(Counter({12: 1}), 2, 10)


def test_files_round_trip_and_fail_in_one_line(tmp_path):
    write_token_counts(tmp_path / "counts.json", Counter({5: 3, 2: 9}))
    assert read_token_counts(tmp_path / "counts.json") == Counter({5: 3, 2: 9})
    assert json.loads((tmp_path / "counts.json").read_text())["response_tokens"] == 12
    with pytest.raises(JetSpecError, match="no token counts"):
        read_token_counts(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"counts": [1, 2]}')
    with pytest.raises(JetSpecError, match="not a token counts file"):
        read_token_counts(tmp_path / "bad.json")
    write_draft_vocab(tmp_path, [1, 4, 8], 0.5, tmp_path / "counts.json")
    assert read_draft_vocab(tmp_path, 3) == [1, 4, 8]
    with pytest.raises(JetSpecError, match="says 4"):
        read_draft_vocab(tmp_path, 4)
    (tmp_path / "draft_vocab.json").write_text('{"size": 3')  # cut short
    with pytest.raises(JetSpecError, match="not a draft vocabulary file"):
        read_draft_vocab(tmp_path, 3)


def test_head_proposes_the_columns_of_its_vocabulary():
    target, draft, _ = random_models("tiny", "cpu", torch.float32)
    hidden = torch.randn(5, target.config.hidden_size, generator=torch.Generator().manual_seed(3))
    full = draft.depth_logits(hidden, target)
    ids = torch.tensor([40, 3, 17, 90])
    draft.set_vocab(ids, target.lm_head.weight)
    assert draft.vocab_ids.tolist() == [3, 17, 40, 90]  # ascending: ties in the top-k go to the lower id
    assert torch.allclose(draft.depth_logits(hidden, target), full[:, [3, 17, 40, 90]], atol=1e-6)
    with pytest.raises(JetSpecError, match="distinct"):
        draft.set_vocab(torch.tensor([3, 3]), target.lm_head.weight)
    draft.set_vocab(None)
    assert draft.vocab_ids is None and torch.equal(draft.depth_logits(hidden, target), full)
