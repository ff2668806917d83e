"""Feature extractors: FID Inception-v3 (random weights, the real file is never downloaded; the pipeline's loader of
the local file) and the LeNet classifier (with the classifier stage's training function)."""

import pytest
import torch
from sklearn.datasets import load_digits

from stein_core.features import ClassifierFeatures, FeatureExtractor, LeNetClassifier, accuracy
from stein_core.inception import FIDInceptionV3, InceptionV3FID
from tasks.data.io import sha256_file
from tasks.stages.classifier import train_classifier
from tasks.stages.evaluate.features import INCEPTION_FID_SHA256_PREFIX, INCEPTION_WEIGHTS_ENV_VAR, load_inception

# ------------------------------------------------------------------------------------------- Inception


@pytest.fixture(scope="module")
def inception() -> InceptionV3FID:
    return InceptionV3FID.random(seed=0, batch_size=2)


def _images(n: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_inception_parameter_count(inception):
    # torchvision's inception_v3 has 27,161,264 parameters: minus AuxLogits (768->128 1x1 conv 98,304 + BN 256,
    # 128->768 5x5 conv 2,457,600 + BN 1,536, fc 768*1000+1000 = 769,000; total 3,326,696) and minus fc
    # (2048*1000+1000 = 2,049,000) leaves 21,785,568. The FID blocks only change pooling, not the shapes.
    net = inception.net
    n_fc = sum(p.numel() for p in net.fc.parameters())
    n_all = sum(p.numel() for p in net.parameters())
    assert n_fc == 2048 * 1008 + 1008
    assert n_all - n_fc == 21_785_568
    assert n_all == 23_850_960


def test_inception_state_dict_names(inception):
    sd = inception.net.state_dict()
    top = list(dict.fromkeys(k.split(".")[0] for k in sd))
    assert top == [
        "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
        "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
        "Mixed_7a", "Mixed_7b", "Mixed_7c", "fc",
    ]  # fmt: skip
    # 94 BasicConv2d, each with conv.weight and bn.{weight, bias, running_mean, running_var,
    # num_batches_tracked}, plus fc.{weight, bias}: 94 * 6 + 2 keys.
    convs = [m for m in inception.net.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in inception.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 94
    assert len(sd) == 94 * 6 + 2
    assert all(c.bias is None for c in convs) and all(b.eps == 0.001 for b in bns)
    for key in [
        "Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "Mixed_5b.branch5x5_2.conv.weight",
        "Mixed_6a.branch3x3dbl_3.bn.bias", "Mixed_6e.branch7x7dbl_5.conv.weight", "Mixed_7a.branch7x7x3_4.bn.weight",
        "Mixed_7c.branch3x3dbl_3b.conv.weight", "Mixed_7c.branch_pool.bn.running_mean", "fc.weight",
    ]:  # fmt: skip
        assert key in sd, key
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert sd["Mixed_7c.branch1x1.conv.weight"].shape == (320, 2048, 1, 1)


def test_inception_protocol_and_spec(inception):
    assert isinstance(inception, FeatureExtractor)
    assert inception.name == "inception_v3_fid" and inception.dim == 2048
    spec = inception.input_spec
    assert spec["range"] == [0.0, 1.0]
    assert spec["resize"] == {"size": [299, 299], "method": "bilinear", "align_corners": False, "antialias": False}


def test_inception_preprocess(inception):
    # A constant image stays constant under bilinear resizing (interpolation weights sum to 1, up to float32
    # rounding) and c maps to 2 c - 1.
    for c in (0.0, 0.5, 1.0):
        z = inception.preprocess(torch.full((1, 1, 28, 28), c))
        assert z.shape == (1, 3, 299, 299)
        assert torch.allclose(z, torch.full_like(z, 2 * c - 1), rtol=0, atol=1e-6)
    # a horizontal ramp stays a monotone ramp (bilinear, not nearest: 299 distinct columns from 28)
    ramp = torch.linspace(0, 1, 28).expand(1, 3, 28, 28)
    row = inception.preprocess(ramp)[0, 0, 0]
    assert (row.diff() >= 0).all() and row.unique().numel() > 250


def test_inception_features_at_299_batch_invariant(inception):
    x = _images(2, 1, 32, 32, seed=1)
    f = inception(x)  # batch of 2
    assert f.shape == (2, 2048) and f.dtype == torch.float64
    assert torch.isfinite(f).all() and (f >= 0).all()  # pool3 averages ReLU outputs
    rows = torch.cat([inception(x[i : i + 1]) for i in range(2)])
    assert torch.allclose(f, rows, rtol=0, atol=1e-5 * float(f.abs().max()))
    assert not torch.allclose(f[0], f[1])  # different images, different features
    # 1 channel is the same as that channel repeated to 3
    assert torch.allclose(inception(x.expand(-1, 3, -1, -1)), f, rtol=0, atol=1e-6 * float(f.abs().max()))


def test_inception_deterministic_small_input():
    a = InceptionV3FID.random(seed=3, resize_to=None)
    b = InceptionV3FID.random(seed=3, resize_to=None)
    c = InceptionV3FID.random(seed=4, resize_to=None)
    rng = torch.random.get_rng_state()
    x = _images(2, 3, 75, 80, seed=2)  # 75 is the smallest size the strides allow
    assert torch.equal(a(x), b(x))
    assert a(x).shape == (2, 2048)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert a.input_spec["resize"] is None and a.input_spec["min_size"] == 75
    assert torch.equal(torch.random.get_rng_state(), rng)  # seeding does not touch the global RNG
    with pytest.raises(ValueError, match="75"):
        a(_images(1, 3, 74, 80, seed=0))
    with pytest.raises(ValueError):
        FIDInceptionV3()(torch.zeros(1, 3, 70, 70))


def test_inception_logits_are_fc_of_the_pool3_features():
    """The Inception score's logits: fc applied to the same pool3 features ``__call__`` returns, batch by batch."""
    net = InceptionV3FID.random(seed=3, resize_to=None, batch_size=1)
    x = _images(2, 1, 75, 75, seed=5)
    logits = net.logits(x)
    assert logits.shape == (2, 1008) and logits.dtype == torch.float64
    fc = net.net.fc
    with torch.no_grad():
        expected = net(x) @ fc.weight.double().T + fc.bias.double()
    assert torch.allclose(logits, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    with pytest.raises(ValueError, match="must lie in"):
        net.logits(x + 2.0)


def test_inception_input_validation(inception):
    with pytest.raises(ValueError, match=r"\[0\.0, 1\.0\]"):
        inception(2 * _images(1, 3, 8, 8, seed=0) - 1)  # [-1, 1] images are a common mistake
    with pytest.raises(ValueError):
        inception(torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError):
        inception(torch.rand(1, 64))
    with pytest.raises(ValueError):
        InceptionV3FID.random(resize_to=64)
    assert inception(torch.zeros(0, 3, 8, 8)).shape == (0, 2048)


def test_inception_from_file(tmp_path, inception):
    missing = tmp_path / "nowhere" / "pt_inception.pth"
    with pytest.raises(FileNotFoundError) as err:
        load_inception(missing)
    msg = str(err.value)
    assert str(missing) in msg and INCEPTION_WEIGHTS_ENV_VAR in msg and "pt_inception-2015-12-05" in msg

    path = tmp_path / "random_inception.pth"
    torch.save(inception.net.state_dict(), path)
    digest = sha256_file(path)
    with pytest.raises(ValueError) as err:
        load_inception(path)
    assert INCEPTION_FID_SHA256_PREFIX in str(err.value) and digest in str(err.value)

    # Strict loading of a file with this layout works and gives back the same weights.
    loaded = load_inception(path, check_hash=False)
    assert loaded.fingerprint() == inception.fingerprint()

    # A file with a missing key fails strict loading.
    sd = inception.net.state_dict()
    del sd["fc.bias"]
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="fc.bias"):
        load_inception(path, check_hash=False)


def test_inception_fingerprint_tracks_weights():
    e = InceptionV3FID.random(seed=5, resize_to=None)
    fp = e.fingerprint()
    assert len(fp) == 64 and fp == e.fingerprint()
    with torch.no_grad():
        e.net.Mixed_6c.branch7x7_2.conv.weight[0, 0, 0, 0] += 1e-3
    assert e.fingerprint() != fp


# ------------------------------------------------------------------------------------------------ LeNet

TRAIN_KW = dict(shape=(1, 8, 8), epochs=10, batch_size=64, lr=5e-3, seed=0)


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0  # [1797, 64] in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * x.shape[0])
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


@pytest.fixture(scope="module")
def trained(digits):
    x_tr, y_tr, _, _ = digits
    return train_classifier(x_tr, y_tr, **TRAIN_KW)


def test_classifier_accuracy(digits, trained):
    _, _, x_te, y_te = digits
    model, history = trained
    assert len(history["loss"]) == TRAIN_KW["epochs"]
    assert history["loss"][-1] < history["loss"][0]
    acc = accuracy(model, x_te, y_te)
    assert acc >= 0.9, acc
    # the extractor's logits agree with accuracy()
    logits = ClassifierFeatures(model).logits(x_te)
    assert logits.shape == (x_te.shape[0], 10) and logits.dtype == torch.float64
    assert float((logits.argmax(1) == y_te).double().mean()) == pytest.approx(acc, abs=1e-12)


def test_classifier_training_deterministic(digits, trained):
    x_tr, y_tr, _, _ = digits
    rng = torch.random.get_rng_state()
    model2, history2 = train_classifier(x_tr, y_tr, **TRAIN_KW)
    assert torch.equal(torch.random.get_rng_state(), rng)  # init seeding does not touch the global RNG
    model, history = trained
    sd, sd2 = model.state_dict(), model2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert history == history2
    assert ClassifierFeatures(model).fingerprint() == ClassifierFeatures(model2).fingerprint()
    model3, _ = train_classifier(x_tr, y_tr, **{**TRAIN_KW, "epochs": 1, "seed": 1})
    assert ClassifierFeatures(model3).fingerprint() != ClassifierFeatures(model).fingerprint()


def test_classifier_features(digits, trained):
    _, _, x_te, _ = digits
    model, _ = trained
    ext = ClassifierFeatures(model, batch_size=50)
    assert isinstance(ext, FeatureExtractor)
    assert ext.dim == 84 and ext.input_spec["range"] == [0.0, 1.0]
    f = ext(x_te)  # flattened input, 7+ batches
    assert f.shape == (x_te.shape[0], 84) and f.dtype == torch.float64
    assert torch.equal(f, ext(x_te.reshape(-1, 1, 8, 8)))
    rows = torch.cat([ClassifierFeatures(model, batch_size=1)(x_te[i : i + 1]) for i in range(5)])
    assert torch.allclose(f[:5], rows, rtol=0, atol=1e-5 * float(f.abs().max()))
    assert model.training is False
    with pytest.raises(ValueError):
        ext(x_te * 16)  # raw 0..16 digits are outside [0, 1]
    with pytest.raises(ValueError):
        ext(torch.rand(3, 1, 28, 28))


def test_classifier_fingerprint_tracks_weights(trained):
    model, _ = trained
    copy = LeNetClassifier(**model.model_args)  # model_args rebuild the network
    copy.load_state_dict(model.state_dict())
    fp = ClassifierFeatures(model).fingerprint()
    assert ClassifierFeatures(copy).fingerprint() == fp
    with torch.no_grad():
        copy.head.bias[0] += 1e-6
    assert ClassifierFeatures(copy).fingerprint() != fp


def test_lenet_mnist_size():
    model = LeNetClassifier(in_channels=1, image_size=28, n_classes=10)
    # conv 1*6*25+6 = 156, conv 6*16*25+16 = 2416, fc 784*120+120 = 94200, 120*84+84 = 10164, 84*10+10 = 850
    assert sum(p.numel() for p in model.parameters()) == 156 + 2416 + 94200 + 10164 + 850
    x = torch.rand(3, 1, 28, 28)
    assert model.logits(x).shape == (3, 10) and model.features(x).shape == (3, 84)
    assert LeNetClassifier(**model.model_args).model_args == model.model_args
    with pytest.raises(ValueError):
        LeNetClassifier(image_size=3)
