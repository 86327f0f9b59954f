import os

# Triton kernels run under the interpreter on CPU tensors; it must be set before any @triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


TINY = [
    "data.dataset=digits", "data.resolution=16", "data.rrc_scale=[0.5,1.0]", "data.flip=false",
    "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]",
    "model.name=resnet18_small", "model.width=4",
    "squeeze.epochs=1", "squeeze.batch_size=64", "squeeze.max_steps=4",
    "recover.iterations=6", "recover.ipc=2", "recover.batch_size=20", "recover.jitter=2",
    "relabel.epochs=2", "train.epochs=2", "train.batch_size=10",
    "evaluate.pgd_steps=3", "evaluate.max_samples=40", "evaluate.batch_size=20",
    "run.progress=false",
]


@pytest.fixture
def tiny_cfg(tmp_path):
    """A whole-pipeline config that runs in seconds: 16 px digits, a width-4 ResNet-18, a few steps each."""
    from guardx.config import load_config

    def make(*overrides: str):
        return load_config(None, [*TINY, f"run.out_dir={tmp_path / 'run'}", *overrides])

    return make


@pytest.fixture(scope="session")
def imagenet_tree(tmp_path_factory):
    """One generated ImageNet-shaped tree per test session (guardx.data.synthetic.write_imagenet_tree):
    10 synsets x 24 train JPEGs of ImageNet sizes, a flat val folder of 50 with every label-file format,
    and one CMYK, one grayscale and one PNG-named-.JPEG file in each split."""
    from guardx.data.synthetic import write_imagenet_tree

    return write_imagenet_tree(tmp_path_factory.mktemp("imagenet"))
