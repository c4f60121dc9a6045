"""The text-encoder cache with a real (tiny) transformers CLIP text model and BPE tokenizer."""

from __future__ import annotations

import pytest
import torch

import stoker
from cache_models import tiny_clip, write_dataset
from conformance import assert_deterministic_and_resumable
from stoker.cache.text import caption_variants
from stoker.data.captions import CaptionRules

pytest.importorskip("transformers")


def reference(model, tokenizer, caption, *, hidden="last"):
    tokens = tokenizer(
        [caption], padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], output_hidden_states=True)
    states = out.last_hidden_state if hidden == "last" else out.hidden_states[-2]
    pooled = getattr(out, "text_embeds", None)
    return states[0], (out.pooler_output if pooled is None else pooled)[0]


def test_batches_carry_the_encoder_outputs_of_their_captions(folder, clip_dirs, tmp_path):
    encoder_dir, tokenizer_dir = clip_dirs
    dataset = stoker.load_dataset(folder.config)
    report = stoker.cache_text_encoder_outputs(
        dataset, encoder_dir, tokenizer_dir, cache_dir=tmp_path / "text"
    )
    # Three distinct captions ("view 0/1/2") and the empty caption: one entry each.
    assert (report.valid, report.stale, report.missing, report.encoded) == (7, 0, 0, 4)
    cached = stoker.load_dataset(folder.config, text_cache=tmp_path / "text")
    model, tokenizer = tiny_clip()
    loader = stoker.make_loader(cached, shuffle=True, seed=2, workers=0, monitor=False)
    for batch in loader:
        assert "images" in batch  # a text cache alone leaves the images as they are
        (states,) = batch["text_hidden_states"]
        (pooled,) = batch["text_pooled"]
        assert states.dtype == torch.bfloat16 and states.shape[1:] == (16, 32)
        for i, caption in enumerate(batch["captions"]):
            want_states, want_pooled = reference(model, tokenizer, caption)
            torch.testing.assert_close(states[i].float(), want_states, atol=3e-2, rtol=2e-2)
            torch.testing.assert_close(pooled[i].float(), want_pooled, atol=3e-2, rtol=2e-2)
        # The mask marks the real tokens (BOS, words, EOS), as the tokenizer's attention mask.
        lengths = [len(tokenizer(c)["input_ids"]) for c in batch["captions"]]
        assert batch["text_attention_masks"][0].sum(dim=1).tolist() == lengths


def test_caption_dropout_uses_the_cached_empty_caption_at_run_time(tmp_path, clip_dirs):
    folder = write_dataset(tmp_path / "data", extra="caption_dropout_rate = 0.5")
    dataset = stoker.load_dataset(folder.config)
    stoker.cache_text_encoder_outputs(dataset, *clip_dirs, cache_dir=tmp_path / "text")
    cached = stoker.load_dataset(folder.config, text_cache=tmp_path / "text")
    model, tokenizer = tiny_clip()
    empty, _ = reference(model, tokenizer, "")
    dropped = 0
    for epoch in range(3):
        for batch in stoker.make_loader(cached, shuffle=True, seed=epoch, workers=0, monitor=False):
            for i, caption in enumerate(batch["captions"]):
                if caption == "":
                    dropped += 1
                    torch.testing.assert_close(
                        batch["text_hidden_states"][0][i].float(), empty, atol=3e-2, rtol=2e-2
                    )
    assert dropped > 0


def test_wildcards_and_lines_give_one_entry_per_final_caption():
    rules = CaptionRules(enable_wildcard=True, caption_prefix="pre")
    variants = caption_variants("a {red|blue} dog, {0|1|2}\nsks cat", rules)
    assert variants == [
        "pre a red dog, 0",
        "pre a red dog, 1",
        "pre a red dog, 2",
        "pre a blue dog, 0",
        "pre a blue dog, 1",
        "pre a blue dog, 2",
        "sks cat",
    ]
    assert caption_variants("a {red|blue}\nb", CaptionRules()) == ["a {red|blue}"]


def test_an_edited_caption_is_stale_and_never_served(folder, clip_dirs, tmp_path):
    dataset = stoker.load_dataset(folder.config)
    stoker.cache_text_encoder_outputs(dataset, *clip_dirs, cache_dir=tmp_path / "text")
    caption = folder.images[4].with_suffix(".txt")
    caption.write_text("a photo of sks cat")
    with pytest.raises(stoker.CacheError) as err:
        stoker.load_dataset(folder.config, text_cache=tmp_path / "text")
    assert "6 valid, 1 stale, 0 missing" in str(err.value) and "4.jpg" in str(err.value)
    edited = stoker.load_dataset(folder.config)
    report = stoker.cache_text_encoder_outputs(edited, *clip_dirs, cache_dir=tmp_path / "text")
    assert (report.encoded, report.valid) == (1, 7)


def test_another_encoder_makes_every_entry_stale(folder, clip_dirs, tmp_path):
    dataset = stoker.load_dataset(folder.config)
    stoker.cache_text_encoder_outputs(dataset, *clip_dirs, cache_dir=tmp_path / "text")
    other, tokenizer = tiny_clip(seed=1)
    report = stoker.cache_text_encoder_outputs(
        dataset, other, tokenizer, cache_dir=tmp_path / "text"
    )
    assert report.encoded == 4 and report.valid == 7


@pytest.mark.parametrize(
    "rule", ["shuffle_caption = true", "caption_tag_dropout_rate = 0.1", "token_warmup_step = 5"]
)
def test_per_step_caption_rules_are_refused(tmp_path, clip_dirs, rule):
    folder = write_dataset(tmp_path / "data", extra=rule)
    dataset = stoker.load_dataset(folder.config)
    with pytest.raises(stoker.CacheError, match=rule.split(" ")[0] + ".*new caption every step"):
        stoker.cache_text_encoder_outputs(dataset, *clip_dirs, cache_dir=tmp_path / "text")


def test_unpadded_storage_pads_at_collate_with_masks(folder, clip_dirs, tmp_path):
    dataset = stoker.load_dataset(folder.config)
    stoker.cache_text_encoder_outputs(
        dataset, *clip_dirs, cache_dir=tmp_path / "text", padding="longest", dtype="float32"
    )
    cached = stoker.load_dataset(folder.config, text_cache=tmp_path / "text")
    model, tokenizer = tiny_clip()
    batch = cached.__getitems__([(0, 0, 0, 0), (0, 1, 1, 0)])
    (states,), (masks,) = batch["text_hidden_states"], batch["text_attention_masks"]
    for i, caption in enumerate(batch["captions"]):
        length = len(tokenizer(caption)["input_ids"])
        assert masks[i].sum() == length
        want, _ = reference(model, tokenizer, caption)
        # CLIP is causal: the real tokens' states do not depend on padding.
        torch.testing.assert_close(states[i, :length], want[:length], atol=1e-5, rtol=1e-5)
        assert not states[i, length:].any()


def test_two_encoders_with_projection_and_penultimate_states(folder, tmp_path):
    first, tokenizer = tiny_clip()
    second, _ = tiny_clip(seed=3, projection=True)
    dataset = stoker.load_dataset(folder.config)
    stoker.cache_text_encoder_outputs(
        dataset,
        [first, second],
        [tokenizer, tokenizer],
        cache_dir=tmp_path / "text",
        hidden_state="penultimate",
    )
    cached = stoker.load_dataset(folder.config, text_cache=tmp_path / "text")
    batch = cached[0]
    assert len(batch["text_hidden_states"]) == 2 and batch["text_pooled"][1].shape == (1, 16)
    want, pooled = reference(second, tokenizer, batch["captions"][0], hidden="penultimate")
    torch.testing.assert_close(
        batch["text_hidden_states"][1][0].float(), want, atol=3e-2, rtol=2e-2
    )
    torch.testing.assert_close(batch["text_pooled"][1][0].float(), pooled, atol=3e-2, rtol=2e-2)


def test_both_caches_from_the_toml_keep_determinism_and_resume(
    folder, vae_dir, clip_dirs, tmp_path
):
    dataset = stoker.load_dataset(folder.config)
    stoker.cache_latents(dataset, vae_dir, cache_dir=folder.root / "cache", workers=0)
    stoker.cache_text_encoder_outputs(dataset, *clip_dirs, cache_dir=folder.root / "cache")
    text = folder.config.read_text()
    folder.config.write_text(
        text.replace("[general]\n", "[general]\nlatent_cache = 'cache'\ntext_cache = 'cache'\n")
    )
    cached = stoker.load_dataset(folder.config)
    batch = cached[0]
    assert "latents" in batch and "text_hidden_states" in batch and "images" not in batch

    def make(seed, workers):
        return stoker.make_loader(cached, shuffle=True, seed=seed, workers=workers, monitor=False)

    assert_deterministic_and_resumable(make, seed=4, midpoint=5, workers=(0, 2))
