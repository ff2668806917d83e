"""Bad input found inside a Ray task reaches the driver as itself: the same ConfigError (file, key, message),
not Ray's RayTaskError with a traceback in its message, so the command exits 2 with one line."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_a_config_error_in_a_ray_task_arrives_as_itself(project, tmp_path):
    import ray

    from tasks.infra.ray_client import init_ray, ray_map
    from tasks.config.sections import ConfigError
    from tasks.data.io import read_dataset, write_dataset
    from tasks.infra.runtime import RuntimeSettings

    good = tmp_path / "good.parquet"
    write_dataset(good, [[0.0, 1.0]] * 3)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not parquet")
    import logging

    root_logger = logging.getLogger()
    level, handlers = root_logger.level, list(root_logger.handlers)
    started = init_ray(RuntimeSettings(num_workers=1, threads=1), project, threads=1)
    # Ray's worker logging config (ERROR) must not reach the driver's own logger: the stages log INFO lines after it
    assert (root_logger.level, root_logger.handlers) == (level, handlers)
    try:
        assert len(dict(ray_map(read_dataset, [str(good)], desc="read"))[0]) == 3
        with pytest.raises(ConfigError) as info:
            dict(ray_map(read_dataset, [str(good), str(bad)], desc="read"))
    finally:
        if started:
            ray.shutdown()
    err = info.value
    assert type(err) is ConfigError and err.path == str(bad) and err.key is None, repr(err)
    assert str(err).startswith(f"{bad}: not a readable Parquet file") and "\n" not in str(err), str(err)
