"""The package lightning_bv.neurons (lightning_bv/neurons/__init__.py): the names other modules import from it."""

import importlib

import lightning_bv.neurons as neurons


def test_every_name_in_all_is_importable_and_all_is_sorted():
    assert neurons.__all__ == sorted(neurons.__all__)
    for name in neurons.__all__:
        assert getattr(neurons, name) is not None, name


def test_names_imported_from_the_old_module_path_are_the_moved_objects():
    moved = {
        "slot": ["Slot", "GroupedSlot", "is_conv1d"],
        "group": ["NeuronGroup", "NeuronGroups"],
        "discovery": ["analyze", "find_neurons", "own_factors", "shared_weights", "_buffers_restored"],
    }
    for module, names in moved.items():
        source = importlib.import_module(f"lightning_bv.neurons.{module}")
        for name in names:
            assert getattr(neurons, name) is getattr(source, name), name
    from lightning_bv._layers import is_null_space, low_rank_factors

    assert neurons.is_null_space is is_null_space
    assert neurons.low_rank_factors is low_rank_factors
