"""What PSNR can a sampler reach on the centre box 16? (docs/results/cifar10-inpaint/README.md)

Full-image PSNR on CIFAR-10 test 0-999, images in [0, 1], of the hole filled with: gray (what `pinv` returns);
a random training image's centre (a sample that ignores the context); the centre of the training image whose
surround (the 768 visible pixels) is nearest, and of the second nearest (crude posterior samples); the mean of
the k nearest centres (a crude posterior mean). Nothing is trained; about a minute on one CPU thread.

    python docs/results/cifar10-inpaint/sampler_bound.py
"""

import torch

from restore.datasets import build_dataset


def images(split: str, n: int | None = None) -> torch.Tensor:
    return torch.tensor(build_dataset("cifar10", split=split).images[:n]).float().div(255).permute(0, 3, 1, 2)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(1 / ((a - b) ** 2).flatten(1).mean(1))).mean().item()


def main() -> None:
    test, train = images("test", 1000), images("train")
    hole = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    hole[..., 8:24, 8:24] = True
    seen = ~hole.expand(1, 3, 32, 32).flatten()
    te, tr = test.flatten(1)[:, seen], train.flatten(1)[:, seen]
    dist = (te**2).sum(1, keepdim=True) - 2 * te @ tr.T + (tr**2).sum(1)[None]
    nearest = dist.topk(16, largest=False).indices
    random = torch.randint(len(train), (len(test),), generator=torch.Generator().manual_seed(0))
    fills = {"gray (pinv)": torch.full_like(test, 0.5), "random training centre": train[random],
             "nearest surround's centre": train[nearest[:, 0]], "second nearest's centre": train[nearest[:, 1]],
             "mean of 4 nearest centres": train[nearest[:, :4]].mean(1),
             "mean of 16 nearest centres": train[nearest].mean(1)}
    for name, fill in fills.items():
        print(f"{name:<28} {psnr(torch.where(hole, fill, test), test):.2f}")


if __name__ == "__main__":
    main()
