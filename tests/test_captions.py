"""Caption dropout and shuffling: a seeded share of training steps sees the empty caption (cached
once per folder through the text cache), the others one of a fixed number of shuffled variants of
the caption (cached per caption); the latents, noise and timesteps stay as without them,
evaluation keeps the captions as written, and the choices depend on the seed only (not the rank)."""

from __future__ import annotations

from functools import partial

import torch

from config.train_config import load_train_config
from conftest import write_configs
from data.batches import Slot, collate, training_text
from data.cache import shuffled_captions
from data.prepare import prepare_dataset
from models import get_model_class
from training.objective import training_example
from utils.dist import Distributed


def reader_for(folder, tiny_models, data, dropout, **dataset):
    config = load_train_config(write_configs(folder, tiny_models / "flux", data,
                                             dataset={"caption_dropout": dropout, **dataset}), get_model_class)
    model = get_model_class("flux")(config.model)
    reader = prepare_dataset(config.dataset, model, title="train", micro_batch_size=1, caching_batch_size=4,
                             regenerate=False, place=Distributed.alone(), log=lambda *_: None)
    return model, reader


def test_caption_dropout(tmp_path, tiny_models, image_dataset):
    model, plain = reader_for(tmp_path / "plain", tiny_models, image_dataset, 0.0)
    _, dropping = reader_for(tmp_path / "dropping", tiny_models, image_dataset, 0.5)
    # the second run encoded one entry only: the empty caption, once for the folder
    assert dropping.encoded == 1 and len(dropping) == len(plain)
    empty_key = dropping.samples[0].empty_key
    assert empty_key and {c.empty_key for c in dropping.samples} == {empty_key}
    folder = dropping.samples[0].folder
    empty = dropping.text_stores[folder].get(empty_key)
    model.load_text_encoders(torch.device("cpu"))
    [expected] = model.encode_captions([""])
    for k in empty:
        torch.testing.assert_close(empty[k], expected[k].cpu())

    dropped = []
    for epoch in range(3):
        for index in range(len(plain)):
            batch = [Slot(index, 0)]
            a_inputs, a_labels = collate(partial(training_example, model), plain, batch, 0, "train", epoch, train=True)
            b_inputs, b_labels = collate(partial(training_example, model), dropping, batch, 0, "train", epoch, train=True)
            drop = training_text(dropping, batch[0], 0, epoch) == empty_key
            dropped.append(drop)
            a, b = model.input_fields.unpack(a_inputs), model.input_fields.unpack(b_inputs)
            # only the text changes, and only for a dropped caption, to the empty caption's
            assert torch.equal(a_labels[0], b_labels[0])
            assert sorted(k for k in a if not torch.equal(a[k], b[k])) == (["pooled", "text"] if drop else [])
            if drop:
                assert torch.equal(b["text"][0], empty["text"].to(b["text"].dtype))
            # evaluation keeps the captions
            e_inputs, _ = collate(partial(training_example, model), dropping, batch, 0, "eval/x", epoch)
            assert torch.equal(model.input_fields.unpack(e_inputs)["text"], a["text"])
    assert 0.25 < sum(dropped) / len(dropped) < 0.75


def test_shuffled_captions_keep_the_leading_tags():
    caption = "ohwx person, red hat, smiling, outdoors, photo"
    variants = shuffled_captions(caption, 4, keep_tokens=1)
    assert variants == shuffled_captions(caption, 4, keep_tokens=1)  # the same every time
    assert len(set(variants)) > 1
    for v in variants:
        tags = v.split(", ")
        assert tags[0] == "ohwx person" and sorted(tags) == sorted(caption.split(", "))
    assert shuffled_captions(caption, 0, 1) == []


def test_caption_shuffling(tmp_path, tiny_models, image_dataset):
    for i, path in enumerate(sorted(image_dataset.glob("*.txt"))):
        path.write_text(f"tag{i}, a, b, c, d")
    model, plain = reader_for(tmp_path / "plain", tiny_models, image_dataset, 0.0)
    _, shuffling = reader_for(tmp_path / "shuffling", tiny_models, image_dataset, 0.0,
                              caption_shuffle_variants=3, keep_tokens=1)
    # 3 variants of each caption, each new text encoded once (a variant may be a caption as written)
    captions = {c.sample.item.caption for c in plain.samples}
    variants = {v for c in shuffling.samples for v, _ in c.variants}
    assert all(len(c.variants) == 3 for c in shuffling.samples)
    assert shuffling.encoded == len(variants - captions) > 8
    used = set()
    for epoch in range(4):
        for index in range(len(plain)):
            batch = [Slot(index, 0)]
            key = training_text(shuffling, batch[0], 0, epoch)
            c = shuffling.samples[index]
            assert key in {k for _, k in c.variants}
            used.add((index, key))
            (a_inputs, a_labels), (b_inputs, b_labels) = (collate(partial(training_example, model), r, batch, 0, "train", epoch, train=True)
                                                          for r in (plain, shuffling))
            assert torch.equal(a_labels[0], b_labels[0])  # the same noise and timesteps
            b = model.input_fields.unpack(b_inputs)
            assert torch.equal(b["text"][0], shuffling.text_stores[c.folder].get(key)["text"].to(b["text"].dtype))
            e_inputs, _ = collate(partial(training_example, model), shuffling, batch, 0, "eval/x", epoch)
            assert torch.equal(model.input_fields.unpack(e_inputs)["text"], model.input_fields.unpack(a_inputs)["text"])
    assert len(used) > len(plain)  # samples see different variants over the epochs
