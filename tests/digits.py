"""A small ResNet trained on scikit-learn's digits, so BN statistics and weights are real."""
import functools

import numpy as np
import torch
import torch.nn.functional as F

import fastres

SIZE = 16


def digits_images():
    """(images [N, 3, 32, 32] in 0..1, labels [N]) from sklearn's 8x8 digits, upscaled."""
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.tensor(data.target)


MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def normalise(images):
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images - mean) / std


@functools.lru_cache(maxsize=1)
def trained_digits_model(steps: int = 150):
    """(model in eval mode, test images, test labels, raw test images); the first 1400 samples
    train a one-block-per-stage fastres ResNet."""
    torch.manual_seed(0)
    model = fastres.ResNet(fastres.BasicBlock, [1, 1, 1, 1], num_classes=10)
    model, x_test, y_test = train_on_digits(model, steps, seed=0)
    return model, x_test, y_test, digits_images()[0][1400:]


def train_on_digits(model, steps: int = 150, seed: int = 0):
    """``model`` (any classifier of [N, 3, 16, 16] images into 10 classes) trained on the first
    1400 digits, BN statistics settled; returns (model in eval mode, test images, test labels)."""
    torch.manual_seed(seed)
    images, labels = digits_images()
    x, y = normalise(images), labels
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (32,), generator=g)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    # settle the BN running statistics on the final weights (cumulative average over the train set)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        for chunk in x_train.split(200):
            model(chunk)
    return model.eval(), x_test, y_test
