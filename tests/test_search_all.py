"""Search a prompt across every SAE against brute force: each SAE encoded alone, every feature scored by a loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saescope.precompute.encode import encode_batch
from saescope.precompute.search_all import search_all


@pytest.fixture(scope="module")
def setup(tiny_lm_dir, tiny_sae_dir, second_sae_dir):
    from saescope.precompute.models import load_model
    from saescope.precompute.saes import load_sae

    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    torch.set_num_threads(1)
    saes = [(n, s, s.cfg.hook_name) for n, s in (("tiny", load_sae(str(tiny_sae_dir))),
                                                 ("relu", load_sae(str(second_sae_dir))))]
    ids = [lm.tokenizer.bos_token_id] + lm.tokenizer("The cat sat on the warm mat today", add_special_tokens=False)["input_ids"]
    return lm, saes, ids


@pytest.mark.parametrize("positions", [None, [3], [2, 5]])
def test_search_all_equals_brute_force(setup, positions):
    lm, saes, ids = setup
    got = search_all(lm, saes, ids, positions, top=1000)
    want = []
    chosen = positions or list(range(1, len(ids)))
    for n, (sid, sae, hook) in enumerate(saes):
        z = encode_batch(lm, sae, np.asarray([ids]), hook)[0].numpy()  # alone; BOS zeroed as special
        with torch.no_grad():
            raw = sae.encode(lm.activations(torch.tensor([ids]), hook)[0]).numpy()  # BOS not zeroed
        for f in range(z.shape[1]):
            vals = [z[p, f] for p in chosen]
            best = max(vals)
            if best > 0 and int(np.argmax(raw[:, f])) != 0:
                want.append((-best, n, f, chosen[int(np.argmax(vals))]))
    want.sort()
    assert [(h.sae_id, h.feature, h.position) for h in got] == [(saes[n][0], f, p) for _, n, f, p in want]
    for h, w in zip(got, want):
        assert h.score == pytest.approx(-w[0], rel=1e-5)
    assert {h.sae_id for h in got} == {"tiny", "relu"}


def test_search_all_refuses_bad_positions(setup):
    from saescope.precompute.errors import UserError

    lm, saes, ids = setup
    with pytest.raises(UserError, match="outside the prompt"):
        search_all(lm, saes, ids, [len(ids)])
    with pytest.raises(UserError, match="not a special token"):
        search_all(lm, saes, ids, [0])
