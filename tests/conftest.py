import pytest
import torch
from PIL import Image

import tinygptv


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    model = tinygptv.load("tiny", seed=1)
    # non-trivial LoRA-B and norm values so tests can tell components apart
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture
def red_image():
    return Image.new("RGB", (40, 30), (220, 20, 20))


@pytest.fixture
def blue_image():
    return Image.new("RGB", (33, 50), (10, 20, 230))
