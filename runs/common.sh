# Sourced by the runs/ pipelines (cpu_demo.sh, gsm8k_gpu.sh), after they set OUT: `timed STAGE command...` runs a
# stage and records its seconds in $OUT/times.json, {stage: {"wall_s", "cpu_s"}}, which their reports read; the CPU
# seconds are user + system, children included (bash's `time`), and bash's own line stays in $OUT/time_STAGE.txt.
TIMEFORMAT="%R %U %S"
rm -f "$OUT/times.json"

timed() {
    local stage=$1 wall user system
    shift
    echo "== $stage: $*"
    { time "$@" 2>&3 ; } 3>&2 2> "$OUT/time_$stage.txt"
    read -r wall user system < <(tail -n 1 "$OUT/time_$stage.txt")
    python - "$OUT/times.json" "$stage" "$wall" "$user" "$system" <<'PY'
import json, os, sys
path, stage, wall, user, system = sys.argv[1:]
times = json.load(open(path)) if os.path.exists(path) else {}
times[stage] = {"wall_s": float(wall), "cpu_s": float(user) + float(system)}
json.dump(times, open(path, "w"), indent=1)
PY
}
