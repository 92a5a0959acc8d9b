"""FID / KID: offline Inception weights, formulas against scipy, feature cache, CIFAR-10 reference value."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from benchmarks import fid
from operators.utils import to_uint8


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """Inception weights converted into a temporary folder (the test never touches the real hub dir)."""
    return fid.convert_inception_weights(tmp_path_factory.mktemp("torch_home") / fid.WEIGHTS_FILENAME)


# ---------------------------------------------------------------------------------------------
# Independent oracles
# ---------------------------------------------------------------------------------------------


def _fid_sqrtm(f1, f2):
    """FID written out with scipy.linalg.sqrtm (needs full-rank covariances)."""
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _mmd2_unbiased(x, y):
    """Unbiased MMD^2 (Binkowski et al. 2018) with the cubic polynomial kernel, gamma = 1/d, coef0 = 1."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * k(x, y).mean())


def _features(rng, n, d, shift=0.0):
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    return (rng.standard_normal((n, d)) @ a + shift).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Formulas
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_fid_from_features_matches_scipy_sqrtm(shift):
    rng = np.random.default_rng(0)
    f1, f2 = _features(rng, 300, 32), _features(rng, 250, 32, shift)
    assert fid.fid_from_features(f1, f2) == pytest.approx(_fid_sqrtm(f1, f2), rel=1e-6, abs=1e-6)
    assert fid.fid_from_features(f1, f1) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("n1, n2", [(300, 200), (20, 30), (12, 200)])  # full rank and rank-deficient (n < d)
def test_fid_from_features_matches_torch_fidelity(n1, n2):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    rng = np.random.default_rng(n1)
    f1, f2 = _features(rng, n1, 64, 0.2), _features(rng, n2, 64)
    stats = [fid_features_to_statistics(torch.from_numpy(f.astype(np.float64))) for f in (f1, f2)]
    expected = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert fid.fid_from_features(f1, f2) == pytest.approx(expected, rel=1e-6)


def test_fid_rejects_bad_feature_sets():
    with pytest.raises(ValueError, match="FID needs"):
        fid.fid_from_features(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="FID needs"):
        fid.fid_from_features(np.zeros((5, 3)), np.zeros((5, 4)))


def test_kid_from_features_matches_unbiased_mmd():
    rng = np.random.default_rng(1)
    f1, f2 = _features(rng, 40, 2048, 0.1), _features(rng, 30, 2048)
    # Subset size = the smaller set: the larger set is subsampled, so replay torch-fidelity's draws.
    mean, std = fid.kid_from_features(f1, f2, subsets=5, seed=7)
    draws = np.random.RandomState(7)
    mmds = [_mmd2_unbiased(f1[draws.choice(40, 30, replace=False)], f2[draws.choice(30, 30, replace=False)])
            for _ in range(5)]
    assert mean == pytest.approx(np.mean(mmds), rel=1e-6)
    assert std == pytest.approx(np.std(mmds), rel=1e-5)
    # Subsets as large as both sets are permutations: every subset gives the full-set MMD.
    mean, std = fid.kid_from_features(f1[:30], f2, subsets=3)
    assert mean == pytest.approx(_mmd2_unbiased(f1[:30], f2), rel=1e-6) and std == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="subset size"):
        fid.kid_from_features(f1, f2, subset_size=31)


# ---------------------------------------------------------------------------------------------
# Weights conversion
# ---------------------------------------------------------------------------------------------


def test_conversion_table_maps_94_distinct_convs():
    assert len(fid.CONV_MAP) == 94 and len(set(fid.CONV_MAP.values())) == 94


def test_converted_extractor_matches_torchscript(weights):
    """torch-fidelity's extractor with the converted weights == the TorchScript original.

    torch-fidelity takes uint8 images and resizes them to 299 (identity at 299) then maps u8 -> (u8 - 128) / 128;
    the TorchScript takes that normalised 299x299 float input directly.
    """
    extractor = fid.inception_extractor("cpu", weights)
    x = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.inference_mode():
        (ours,) = extractor(x)
        ref = fid.load_torchscript_inception()((x.float() - 128) / 128)
    assert ours.shape == (2, 2048)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert ref.abs().max().item() > 0.1  # a real comparison, not of two zero vectors
    assert torch.isnan(extractor.fc.weight).all()  # no classifier head in the source: IS must fail loudly


def test_weights_default_location_is_torch_hub(tmp_path, monkeypatch):
    calls = []

    def fake_convert(dst, src=None):
        calls.append(dst)
        dst.parent.mkdir(parents=True)
        dst.write_bytes(b"w")
        return dst

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(fid, "convert_inception_weights", fake_convert)
    expected = tmp_path / "hub" / "checkpoints" / fid.WEIGHTS_FILENAME
    assert fid.inception_weights_path() == expected and calls == [expected]
    assert fid.inception_weights_path() == expected and len(calls) == 1  # present: not converted again
    assert not list(expected.parent.glob("*.tmp"))


def test_extractor_refuses_pickled_objects(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1), "obj": fid.Path("x")}, bad)
    with pytest.raises(Exception, match="[Ww]eights only"):
        fid.inception_extractor("cpu", bad)


# ---------------------------------------------------------------------------------------------
# Image sets, cache, end to end
# ---------------------------------------------------------------------------------------------


def test_image_set_formats_share_one_key(cifar_test, cifar_test_uint8):
    x = cifar_test[:5]
    u8 = to_uint8(x)
    assert torch.equal(fid.as_uint8(cifar_test_uint8[:5]), u8)  # numpy NHWC == torch NCHW
    keys = {fid.features_key(v) for v in (x, u8, cifar_test_uint8[:5], x + 0.001)}
    assert len(keys) == 1  # float images are keyed by their 8-bit values
    changed = u8.clone()
    changed[3, 1, 7, 9] ^= 1
    assert fid.features_key(changed) not in keys
    assert fid.features_key(u8[:4]) not in keys
    gray = fid.as_uint8(u8[:, :1])
    assert gray.shape == (5, 3, 32, 32) and torch.equal(gray[:, 2], u8[:, 0])
    with pytest.raises(TypeError):
        fid.as_uint8(cifar_test_uint8[:5].astype(np.float32))


def _fake_extract(calls):
    """Deterministic stand-in features (no Inception): a random projection of the pixels."""
    proj = np.random.default_rng(0).standard_normal((3 * 32 * 32, 16)).astype(np.float32)

    def extract(images, **kwargs):
        calls.append(len(images))
        return (fid.as_uint8(images).flatten(1).numpy().astype(np.float32) / 255) @ proj

    return extract


def test_features_cache_hit_and_invalidation(cifar_test, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fid, "inception_features", _fake_extract(calls))
    key, f1 = fid.cached_features(cifar_test[:8], tmp_path)
    assert calls == [8]
    key2, f2 = fid.cached_features(to_uint8(cifar_test[:8]), tmp_path)
    assert calls == [8] and key2 == key and np.array_equal(f1, f2)  # hit: not recomputed
    path = tmp_path / "fid" / f"{key}.npz"
    with np.load(path, allow_pickle=False) as f:
        assert str(f["extractor"]) == fid.EXTRACTOR_ID and np.array_equal(f["features"], f1)
    assert not list(path.parent.glob("*.tmp"))
    changed = to_uint8(cifar_test[:8])
    changed[0, 0, 0, 0] ^= 1
    key3, _ = fid.cached_features(changed, tmp_path)
    assert key3 != key and calls == [8, 8]
    assert np.array_equal(fid.load_cached_features(key, tmp_path), f1)
    with pytest.raises(FileNotFoundError, match="no cached features"):
        fid.load_cached_features("0" * 64, tmp_path)
    with pytest.raises(ValueError, match="not a features key"):
        fid.load_cached_features("../x", tmp_path)


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("BCM_RESTORE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fid.cache_dir() == tmp_path / "xdg" / "bcm-restore" / "fid"
    monkeypatch.setenv("BCM_RESTORE_CACHE", str(tmp_path / "env"))
    assert fid.cache_dir() == tmp_path / "env" / "fid"
    assert fid.cache_dir(tmp_path / "arg") == tmp_path / "arg" / "fid"


def test_compute_fid_kid_with_reference_key(cifar_test, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fid, "inception_features", _fake_extract(calls))
    a, b = cifar_test[:20], cifar_test[20:50]
    out = fid.compute_fid_kid(a, b, cache=tmp_path, kid_subsets=4)
    fa, fb = _fake_extract([])(a), _fake_extract([])(b)
    assert out["fid"] == pytest.approx(fid.fid_from_features(fa, fb), rel=1e-9)
    assert out["kid"] == pytest.approx(fid.kid_from_features(fa, fb, subsets=4)[0], rel=1e-9)
    assert (out["n"], out["n_reference"], out["kid_subset_size"]) == (20, 30, 20)
    again = fid.compute_fid_kid(a, out["reference_key"], cache=tmp_path, kid_subsets=4)
    assert calls == [30, 20, 20]  # the reference was extracted once
    assert again == out


def test_fid_kid_end_to_end_on_cifar(cifar_test_uint8, weights, tmp_path):
    """Real Inception features of 8 vs 8 CIFAR-10 images: the metrics equal the scipy/numpy formulas."""
    a, b = cifar_test_uint8[:8], cifar_test_uint8[8:16]
    out = fid.compute_fid_kid(a, b, cache=tmp_path, cache_images=True, device="cpu", weights_path=weights,
                              batch_size=4, kid_subsets=3)
    fa = fid.load_cached_features(fid.features_key(a), tmp_path)
    fb = fid.load_cached_features(out["reference_key"], tmp_path)
    assert fa.shape == fb.shape == (8, 2048) and fa.dtype == np.float32
    assert out["fid"] == fid.fid_from_features(fa, fb)  # the formula itself is checked above
    assert out["kid"] == pytest.approx(_mmd2_unbiased(fa, fb), rel=1e-6)
    assert out["fid"] > 50  # two different small sets: far from 0 (FID is biased upward at small N)


@pytest.mark.slow
def test_fid_cifar10_train_vs_test_reproduces_torch_fidelity(weights, tmp_path):
    """torch-fidelity's reference: FID(CIFAR-10 train[:5000], test[:5000]) = 10.32333 (~26 min on 2 CPU cores)."""
    from conftest import shared_file

    with np.load(shared_file("cifar10_train.npz"), allow_pickle=False) as f:
        train = f["x"][:5000]
    with np.load(shared_file("cifar10_test.npz"), allow_pickle=False) as f:
        test = f["x"][:5000]
    out = fid.compute_fid_kid(train, test, cache=tmp_path, weights_path=weights)
    print(f"FID(train[:5000], test[:5000]) = {out['fid']:.5f}, KID = {out['kid']:.6f}")
    assert out["fid"] == pytest.approx(10.32333, abs=0.02)
