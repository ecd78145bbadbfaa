"""POD (methods/pod.py) against explicit pooling loops and hand-made inputs."""
import math

import pytest
import torch

from methods.pod import PODConfig, PODLayer, collapse_logits, parse_pod_config, pod_embed, pod_loss, preprocess
from utils.errors import UserError


def _maps(seed=0, shapes=((2, 3, 8, 8), (2, 4, 4, 4))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


def test_local_embedding_matches_loops():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    emb = pod_embed(x, "local", (1, 2))
    expected = []
    for b in range(2):
        row = []
        for s in (1, 2):
            k = 8 // s
            for i in range(s):
                for j in range(s):
                    r = x[b, :, i * k:(i + 1) * k, j * k:(j + 1) * k]
                    row += [r[c, h, :].mean().item() for c in range(3) for h in range(k)]  # width-pooled
                    row += [r[c, :, w].mean().item() for c in range(3) for w in range(k)]  # height-pooled
        expected.append(row)
    torch.testing.assert_close(emb, torch.tensor(expected, dtype=torch.float64))


def test_spatial_embedding():
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    emb = pod_embed(x, "spatial")
    torch.testing.assert_close(emb[0, :6], x[0].sum(dim=2).flatten())
    torch.testing.assert_close(emb[0, 6:], x[0].sum(dim=1).flatten())


def test_identical_features_give_zero_and_loss_grows_with_the_difference():
    old = _maps()
    cfg = PODConfig()
    kw = dict(n_old=3, n_classes=5, n_new=2)
    assert pod_loss(old, [m.clone() for m in old], cfg, **kw).item() == 0
    noise = _maps(1)
    values = [pod_loss(old, [m + t * n for m, n in zip(old, noise)], cfg, **kw).item() for t in (0.1, 0.5, 1, 2)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_distance_factor_schedule_and_division_by_number_of_maps():
    old = _maps()
    new = _maps(2)
    layer = PODLayer(collapse="spatial", factor=0.3, prepro="none")
    cfg = PODConfig(inner=layer, last=PODLayer(collapse="spatial", factor=0.7, prepro="none"), schedule=True)
    expected = 0.0
    for m_old, m_new, f in zip(old, new, (0.3, 0.7)):
        per_image = []
        for b in range(2):
            a = torch.cat([m_old[b].sum(2).flatten(), m_old[b].sum(1).flatten()])
            c = torch.cat([m_new[b].sum(2).flatten(), m_new[b].sum(1).flatten()])
            per_image.append(math.sqrt(((a - c) ** 2).sum().item()))
        expected += f * math.sqrt(5 / 2) * sum(per_image) / 2
    got = pod_loss(old, new, cfg, n_old=3, n_classes=5, n_new=2)
    assert got.item() == pytest.approx(expected / 2, rel=1e-9)
    no_schedule = pod_loss(old, new, PODConfig(inner=cfg.inner, last=cfg.last, schedule=False), n_old=3,
                           n_classes=5, n_new=2)
    assert got.item() == pytest.approx(no_schedule.item() * math.sqrt(5 / 2), rel=1e-9)


def test_logits_collapse():
    x = torch.arange(2 * 5 * 2 * 2, dtype=torch.float64).view(2, 5, 2, 2)
    summed = collapse_logits(x, 3, "sum")
    torch.testing.assert_close(summed[:, 0], x[:, 0] + x[:, 3] + x[:, 4])
    torch.testing.assert_close(summed[:, 1:], x[:, 1:3])
    torch.testing.assert_close(collapse_logits(x, 3, "trim"), x[:, :3])


def test_new_logits_compared_after_collapse():
    old_logits = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    new_logits = torch.cat([old_logits[:, :1] - 1.0, old_logits[:, 1:], torch.full((2, 1, 4, 4), 1.0,
                                                                                      dtype=torch.float64)], 1)
    cfg = PODConfig(last=PODLayer(factor=1.0, extra_channels="sum"))
    assert pod_loss([old_logits], [new_logits], cfg, n_old=3, n_classes=4, n_new=1).item() == pytest.approx(0)
    cfg_trim = PODConfig(last=PODLayer(factor=1.0, extra_channels="trim"))
    assert pod_loss([old_logits], [new_logits], cfg_trim, n_old=3, n_classes=4, n_new=1).item() > 0


def test_preprocessing():
    x = torch.tensor([-2.0, 3.0])
    assert preprocess(x, "pow").tolist() == [4.0, 9.0]
    assert preprocess(x, "abs").tolist() == [2.0, 3.0]
    assert preprocess(x, "relu").tolist() == [0.0, 3.0]


def test_plop_options_parse():
    cfg = parse_pod_config(collapse="local", factor=0.01, prepro="pow", spp_scales=[1, 2, 4],
                           options={"switch": {"after": {"extra_channels": "sum", "factor": 0.0005,
                                                         "type": "local"}}}, schedule=True, logits=True)
    assert cfg.inner == PODLayer(collapse="local", factor=0.01)
    assert cfg.last == PODLayer(collapse="local", factor=0.0005, extra_channels="sum")
    assert cfg.logits and cfg.schedule


@pytest.mark.parametrize("options", [{"bogus": 1}, {"switch": {"after": {"norm": True}}},
                                     {"switch": {"after": {"type": "weird"}}}, {"difference_function": "kl"}])
def test_bad_options_are_user_errors(options):
    with pytest.raises(UserError):
        parse_pod_config(collapse="local", factor=0.01, prepro="pow", spp_scales=[1, 2, 4], options=options,
                         schedule=True, logits=False)
