"""Scoring published tags against a clip's ground truth: nulls and settling frames are skipped."""

from retrofit_agent.train.world.records import FrameRecord
from retrofit_agent.train.world.score import format_scores, score_tags, settled


def _truth() -> dict[int, FrameRecord]:
    out = {}
    for i in range(40):  # 2 segments of 20 frames at 10 fps
        seg = i // 20
        labels = {"weather": "rain" if seg == 0 else None, "signs": "stop" if seg == 0 else "yield"}
        out[i] = FrameRecord(frame=i, time_s=i / 10, segment=f"s{seg}", segment_index=seg, labels=labels, boxes=[])
    return out


def _msg(frame: int, weather: str, signs: str) -> dict:
    return {
        "topic": "tags",
        "frame_id": frame,
        "top": [{"group": "weather", "label": weather, "score": 0.9}, {"group": "signs", "label": signs, "score": 0.9}],
    }


def test_frames_within_the_settling_time_of_a_segment_are_skipped():
    keep = settled(_truth(), settle_s=1.0)
    assert min(keep) == 10 and 19 in keep and 20 not in keep and 30 in keep and len(keep) == 20


def test_accuracy_counts_settled_observable_frames_and_names_the_confusions():
    truth = _truth()
    msgs = [_msg(i, "rain" if i % 2 else "fog", "stop" if i < 20 else "yield") for i in range(40)]
    scores = score_tags(msgs, truth, settle_s=1.0)
    assert scores["weather"].total == 10  # frames 10-19; segment 1's weather is null
    assert scores["weather"].correct == 5 and scores["weather"].confusions == {("rain", "fog"): 5}
    assert scores["signs"].total == 20 and scores["signs"].accuracy == 1.0
    table = format_scores(scores, goal=0.9)
    assert "rain -> fog (5)" in table and "50.0%" in table
