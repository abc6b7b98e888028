"""Caption dropout: a seeded share of training steps sees the empty caption, whose embedding is
cached once per folder through the text cache; the latents, noise and timesteps stay as without
it, evaluation keeps the captions, and the choices depend on the seed only (not the rank)."""

from __future__ import annotations

import torch

from conftest import write_configs
from models import get_model_class
from utils.batches import Slot, caption_dropped, collate
from utils.config import load_train_config
from utils.prepare import prepare_dataset


def reader_for(folder, tiny_models, data, dropout):
    config = load_train_config(write_configs(folder, tiny_models / "flux", data, dataset={"caption_dropout": dropout}))
    model = get_model_class("flux")(config.model)
    reader = prepare_dataset(config.dataset, model, title="train", micro_batch_size=1, caching_batch_size=4,
                             regenerate=False, rank=0, world=1, device=torch.device("cpu"), log=lambda *_: None)
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
            a_inputs, a_labels = collate(model, plain, batch, 0, "train", epoch, train=True)
            b_inputs, b_labels = collate(model, dropping, batch, 0, "train", epoch, train=True)
            drop = caption_dropped(dropping, batch[0], 0, epoch)
            dropped.append(drop)
            a, b = model.input_fields.unpack(a_inputs), model.input_fields.unpack(b_inputs)
            # only the text changes, and only for a dropped caption, to the empty caption's
            assert torch.equal(a_labels[0], b_labels[0])
            assert sorted(k for k in a if not torch.equal(a[k], b[k])) == (["pooled", "text"] if drop else [])
            if drop:
                assert torch.equal(b["text"][0], empty["text"].to(b["text"].dtype))
            # evaluation keeps the captions
            e_inputs, _ = collate(model, dropping, batch, 0, "eval/x", epoch)
            assert torch.equal(model.input_fields.unpack(e_inputs)["text"], a["text"])
    assert 0.25 < sum(dropped) / len(dropped) < 0.75
