from fedapp.server.stopping import best_round, round_score, stop_reason


def history(scores):
    return [{"round": 0, "central": {"video-accuracy": 0.1}}] + [
        {"round": i + 1, "central": {"video-accuracy": s}} for i, s in enumerate(scores)
    ]


def test_flat_metric_triggers_patience():
    assert stop_reason(history([0.5, 0.5, 0.5]), patience=3, min_delta=0.0, target=0) is None
    reason = stop_reason(history([0.5, 0.5, 0.5, 0.5]), patience=3, min_delta=0.0, target=0)
    assert reason and "for 3 rounds" in reason


def test_improvements_below_min_delta_do_not_count():
    assert stop_reason(history([0.5, 0.505, 0.51, 0.515]), patience=3, min_delta=0.02, target=0)
    assert stop_reason(history([0.5, 0.55, 0.6, 0.65]), patience=3, min_delta=0.02, target=0) is None


def test_target_accuracy_and_off_by_default():
    assert "target-accuracy 0.9 reached" in stop_reason(history([0.5, 0.91]), 0, 0.0, 0.9)
    assert stop_reason(history([0.5] * 20), patience=0, min_delta=0.0, target=0) is None


def test_falls_back_to_client_evaluation_and_best_round():
    record = {"round": 1, "central": {}, "evaluate": {"video-accuracy": 0.7}}
    assert round_score(record) == 0.7
    assert best_round(history([0.4, 0.8, 0.8, 0.6])) == (2, 0.8)
