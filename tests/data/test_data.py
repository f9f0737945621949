import pytest
import torch

from tda_explorer import TDAError
from tda_explorer.data import AttributionDataset, ImageRenderer, flip_labels, load_digits_split


def test_mismatched_lengths_name_both_arguments():
    with pytest.raises(TDAError, match="inputs and labels must have the same length.*3 inputs and 2 labels"):
        AttributionDataset(torch.zeros(3, 2), torch.tensor([0, 1]))


def test_empty_training_set_is_refused():
    with pytest.raises(TDAError, match="empty"):
        AttributionDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), name="train")


def test_duplicate_and_missing_ids():
    with pytest.raises(TDAError, match="unique"):
        AttributionDataset(torch.zeros(2, 2), torch.tensor([0, 1]), ids=["a", "a"])
    data = AttributionDataset(torch.zeros(2, 2), torch.tensor([0, 1]), ids=["a", "b"])
    assert data.positions(["b", "a"]) == [1, 0]
    with pytest.raises(TDAError, match=r"test_id: \['zz'\] not in dataset"):
        data.positions(["zz"], "test_id")


def test_flip_labels_flips_exact_fraction_to_other_classes():
    labels = torch.arange(200) % 10
    noisy, flipped = flip_labels(labels, 0.1, 10, seed=3)
    assert int(flipped.sum()) == 20
    assert (noisy[flipped] != labels[flipped]).all()
    assert (noisy[~flipped] == labels[~flipped]).all()
    again, _ = flip_labels(labels, 0.1, 10, seed=3)
    assert torch.equal(noisy, again)


def test_digits_split_keeps_noise_mask_and_renders_png():
    split = load_digits_split(n_train=100, n_test=20, noise=0.2, seed=1)
    assert len(split.train) == 100 and len(split.test) == 20
    assert int(split.flipped.sum()) == 20
    assert ((split.train.labels != split.clean_train_labels) == split.flipped).all()
    png = split.train.thumbnail(0)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(split.train.renderer, ImageRenderer)
    with pytest.raises(TDAError, match="n_train \\+ n_test must be at most 1797"):
        load_digits_split(n_train=1500, n_test=400)


def test_inputs_that_are_not_one_array_are_refused_naming_inputs():
    """A dict of tensors (a tokenizer's batch) points to from_torch; ragged lists say what they are."""
    with pytest.raises(TDAError, match=r"inputs: a dict \(input_ids, attention_mask\) .*from_torch"):
        AttributionDataset({"input_ids": torch.zeros(3, 4), "attention_mask": torch.ones(3, 4)}, torch.zeros(3))
    with pytest.raises(TDAError, match="inputs must be one tensor or array of numbers"):
        AttributionDataset([[1.0, 2.0], [3.0]], torch.zeros(2))


def test_arrays_become_float32_features_and_tensors_keep_their_dtype():
    """A DataFrame, a uint8 image array or booleans are features (float32, read-only arrays copied); token ids given as
    an integer tensor stay integers for an embedding."""
    import numpy as np
    import pandas as pd
    from torch import nn

    from tda_explorer import AttributionTask, get_method

    frame = pd.DataFrame({"age": [31, 45, 27], "count": [1, 0, 2]})
    images = np.random.default_rng(0).integers(0, 255, size=(3, 1, 4, 4)).astype(np.uint8)
    for given in (frame, images, np.array([[True], [False], [True]])):
        assert AttributionDataset(given, [0, 1, 0]).inputs.dtype == torch.float32
    ids = torch.randint(0, 20, (12, 5))
    tokens = AttributionDataset(ids, np.arange(12) % 2)
    assert tokens.inputs.dtype == torch.int64
    model = nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(20, 2))
    assert get_method("grad-dot", AttributionTask(model)).fit(tokens).attribute(tokens).scores.shape == (12, 12)


def test_whole_float_labels_are_class_indices_and_fractional_ones_are_refused():
    assert AttributionDataset(torch.zeros(3, 2), [0.0, 2.0, 1.0]).labels.tolist() == [0, 2, 1]
    with pytest.raises(TDAError, match="not whole numbers: regression and multi-label targets are not supported"):
        AttributionDataset(torch.zeros(3, 2), torch.tensor([0.5, 1.2, 3.3]))


def test_a_dataset_that_augments_at_random_is_flagged_and_a_fixed_one_is_not():
    import warnings

    from tda_explorer.data.torch_dataset import NondeterministicItemsWarning

    images, labels = torch.randn(8, 1, 4, 4), torch.arange(8) % 2

    class Augmenting(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return images[i] + 0.1 * torch.randn(1, 4, 4), int(labels[i])

    with pytest.warns(NondeterministicItemsWarning, match="reading its first items again gave other inputs"):
        AttributionDataset.from_torch(Augmenting())
    with warnings.catch_warnings():
        warnings.simplefilter("error", NondeterministicItemsWarning)
        AttributionDataset.from_torch(torch.utils.data.TensorDataset(images, labels))
