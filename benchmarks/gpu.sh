#!/usr/bin/env bash
# The GPU run book: the first thing to run on a machine with a GPU (<= 8 minutes all told).
#
#   bash benchmarks/gpu.sh [--budget-s 450] [--out FILE] [--families "llava llava_next qwen2_5_vl"] [--no-install]
#   bash benchmarks/gpu.sh --dry-run          # the same steps at toy sizes on the CPU (< 2 minutes)
#   bash benchmarks/gpu.sh --steps "measure"  # only some of the steps (flash-attn, measure, throughput)
#
# Steps, in order, each timed and each given its share of the budget (time a step leaves unused goes to the later
# ones; a step that fails prints why and the script goes on; when the budget is spent the remaining steps are
# skipped with a note):
#   1. flash-attn  import flash_attn; if it does not import, `pip install --only-binary=:all: flash-attn` (a wheel
#                  or nothing: never a build from source), then import again; the flash-attention-2 rows need it
#   2. measure     python -m benchmarks.gpu_run: the GPU's name, versions, date; then per architecture
#                  (LLaVA-1.5-7B fp16, LLaVA-NeXT-7B fp16, Qwen2.5-VL-7B bf16; random weights built on the GPU):
#                  no-op overhead, every pruner at equal budgets with sdpa and flash-attention-2 (576 -> 192/128/64;
#                  NeXT 2880 -> 144), var/vhr/pai decode overhead
#   3. throughput  eval throughput at batch 1/8/32 per architecture (python -m benchmarks.eval_throughput), if that
#                  module is present; in a dry run once, for the first architecture, with --dry-run --no-lmms
# Writes ONE markdown file: --out, else $OUT/gpu_results.md if $OUT is set, else benchmarks/gpu_results.md
# (gitignored; the console output goes to gpu_results.log beside it); its path is printed at the end. Exit status 1 if any step failed or was cut or skipped for lack of
# time; a missing optional part (flash_attn, benchmarks.eval_throughput) is a noted skip, not a failure.
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}

DRY=0
BUDGET=""
OUTFILE=""
FAMILIES="llava llava_next qwen2_5_vl"
INSTALL=1
TPUT_MODULE=benchmarks.eval_throughput
ONLY="flash-attn measure throughput"
usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget-s) BUDGET=${2:-}; shift ;;
    --out) OUTFILE=${2:-}; shift ;;
    --families) FAMILIES=${2:-}; shift ;;
    --no-install) INSTALL=0 ;;
    --throughput-module) TPUT_MODULE=${2:-}; shift ;;
    --steps) ONLY=${2:-}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu.sh: unknown option '$1' (allowed: --dry-run --budget-s N --out FILE --families LIST --no-install" \
            "--steps LIST --throughput-module MODULE)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$BUDGET" ]; then BUDGET=$([ $DRY = 1 ] && echo 150 || echo 450); fi
case "$BUDGET" in ''|*[!0-9]*) echo "gpu.sh: --budget-s '$BUDGET' is not a whole number of seconds" >&2; exit 2 ;; esac
[ -n "$FAMILIES" ] || { echo "gpu.sh: --families is empty (allowed: llava llava_next qwen2_vl qwen2_5_vl)" >&2; exit 2; }
for f in $FAMILIES; do
  case "$f" in llava|llava_next|qwen2_vl|qwen2_5_vl) ;;
    *) echo "gpu.sh: unknown family '$f' (allowed: llava llava_next qwen2_vl qwen2_5_vl)" >&2; exit 2 ;; esac
done
[ -n "$TPUT_MODULE" ] || { echo "gpu.sh: --throughput-module is empty" >&2; exit 2; }
[ -n "$ONLY" ] || { echo "gpu.sh: --steps is empty (allowed: flash-attn measure throughput)" >&2; exit 2; }
for s in $ONLY; do
  case "$s" in flash-attn|measure|throughput) ;;
    *) echo "gpu.sh: unknown step '$s' (allowed: flash-attn measure throughput)" >&2; exit 2 ;; esac
done
wanted() { case " $ONLY " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
if [ -z "$OUTFILE" ]; then
  if [ -n "${OUT:-}" ]; then OUTFILE="$OUT/gpu_results.md"; else OUTFILE="$ROOT/benchmarks/gpu_results.md"; fi
fi
mkdir -p "$(dirname "$OUTFILE")" && : > "$OUTFILE" || { echo "gpu.sh: cannot write $OUTFILE" >&2; exit 1; }
LOG="${OUTFILE%.md}.log"   # the console output too (tracebacks of failed parts), next to the results
exec > >(tee "$LOG") 2>&1

now() { date +%s; }
T0=$(now)
FAILED=0
STEPS=()          # "| step | status | seconds | note |" rows of the summary
N_FAMILIES=$(echo $FAMILIES | wc -w)

HAVE_TPUT=1       # the throughput steps get a share of the budget only if their module is there
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$TPUT_MODULE') is None)" 2>/dev/null || HAVE_TPUT=0
TPUT_FAMILIES=$FAMILIES
[ $DRY = 1 ] && TPUT_FAMILIES=${FAMILIES%% *}   # a dry run checks the call once
wanted throughput || TPUT_FAMILIES=""
ALL_STEPS=()
wanted flash-attn && ALL_STEPS+=(flash-attn)
wanted measure && ALL_STEPS+=(measure)
[ $HAVE_TPUT = 1 ] && for f in $TPUT_FAMILIES; do ALL_STEPS+=("throughput:$f"); done

# each step's weight in the share of the remaining budget, and the least time that makes it worth starting
weight() { case "$1" in flash-attn) echo 1 ;; measure) echo $(( 6 * N_FAMILIES )) ;; throughput:*) echo 3 ;; esac; }
floor() {
  if [ $DRY = 1 ]; then case "$1" in measure) echo 30 ;; throughput:*) echo 15 ;; *) echo 5 ;; esac
  else case "$1" in measure) echo $(( 60 * N_FAMILIES )) ;; throughput:*) echo 30 ;; *) echo 15 ;; esac; fi
}

record() {  # step status seconds note
  STEPS+=("| $1 | $2 | $3 | $4 |")
  printf '[gpu.sh] %-24s %-8s %4ss  (%ss of %ss used)  %s\n' "$1" "$2" "$3" "$(( $(now) - T0 ))" "$BUDGET" "$4"
  case "$2" in FAILED|CUT|SKIPPED) FAILED=1 ;; esac
}

STEP_TIMEOUT=0
# begin_step INDEX: sets STEP_TIMEOUT to the step's share of what is left, or records a skip and returns 1
begin_step() {
  local name=${ALL_STEPS[$1]} left s fl w rest=0 j
  left=$(( BUDGET - ($(now) - T0) ))
  w=$(weight "$name")
  for ((j = $1; j < ${#ALL_STEPS[@]}; j++)); do rest=$(( rest + $(weight "${ALL_STEPS[$j]}") )); done
  s=$(( left * w / rest ))
  fl=$(floor "$name")
  [ "$s" -lt "$fl" ] && s=$fl
  [ "$s" -gt "$left" ] && s=$left
  if [ "$s" -lt "$fl" ]; then
    record "$name" SKIPPED 0 "budget spent (${left}s left of ${BUDGET}s; the step needs at least ${fl}s)"
    printf '%s\n' "" "## $name" "" "**SKIPPED**: the ${BUDGET}-s budget ran out (${left}s left)." "" >> "$OUTFILE"
    return 1
  fi
  STEP_TIMEOUT=$s
  echo "[gpu.sh] ---- $name (up to ${s}s) ----"
}

# run_timed CMD...: runs it under STEP_TIMEOUT; sets RC (124 or 137: cut at the limit) and ELAPSED
run_timed() {
  local t
  t=$(now)
  timeout --kill-after=10 "$STEP_TIMEOUT" "$@"
  RC=$?
  ELAPSED=$(( $(now) - t ))
}

i=0
# 1. flash-attention-2: a prebuilt wheel or nothing
FLASH_NOTE=""
if wanted flash-attn && begin_step $i; then
  t=$(now)
  if "$PY" -c "import flash_attn" 2>/dev/null; then
    record flash-attn ok $(( $(now) - t )) "flash_attn imports"
  elif [ $DRY = 1 ] || [ $INSTALL = 0 ]; then
    FLASH_NOTE="flash_attn does not import; $([ $DRY = 1 ] && echo 'dry run' || echo '--no-install'): pip install --only-binary=:all: --no-deps flash-attn einops not run; flash-attention-2 rows skipped"
    record flash-attn skipped $(( $(now) - t )) "$FLASH_NOTE"
  else
    echo "[gpu.sh] flash_attn does not import: trying a prebuilt wheel (never a source build)"
    run_timed "$PY" -m pip install --only-binary=:all: --no-deps --retries 0 --timeout 15 flash-attn einops
    if [ $RC -eq 0 ] && "$PY" -c "import flash_attn"; then
      record flash-attn ok $(( $(now) - t )) "installed from a wheel"
    else
      FLASH_NOTE="no flash-attn wheel installed and imported (pip rc $RC; a source build is never tried): flash-attention-2 rows skipped"
      record flash-attn skipped $(( $(now) - t )) "$FLASH_NOTE"
    fi
  fi
fi
wanted flash-attn && i=$((i + 1))

# 2. the measurements (one process: one start of torch, transformers and CUDA)
ATTNS="sdpa flash_attention_2"
[ $DRY = 1 ] && ATTNS="sdpa eager flash_attention_2"   # eager exercises the switch of implementation on the CPU
if wanted measure && begin_step $i; then
  deadline=$(( $(now) + STEP_TIMEOUT - STEP_TIMEOUT / 10 - 3 ))   # time to write and exit before the kill
  run_timed "$PY" -m benchmarks.gpu_run --out "$OUTFILE" --deadline "$deadline" --families $FAMILIES \
    --attn $ATTNS $([ $DRY = 1 ] && echo --dry-run)
  case $RC in
    0) record measure ok "$ELAPSED" "" ;;
    3) record measure FAILED "$ELAPSED" "no CUDA device: nothing to measure (bash benchmarks/gpu.sh --dry-run checks the steps on a CPU)"
       HAVE_TPUT=0; TPUT_FAMILIES="" ;;
    124|137) record measure CUT "$ELAPSED" "killed at its ${STEP_TIMEOUT}s limit; the sections finished before are kept"
             printf '%s\n' "" "**CUT** at the step's ${STEP_TIMEOUT}-s limit." "" >> "$OUTFILE" ;;
    *) record measure FAILED "$ELAPSED" "rc $RC: see the FAILED / SKIPPED parts in the table file and the log above" ;;
  esac
fi
[ -n "$FLASH_NOTE" ] && printf '%s\n' "" "flash-attention-2: $FLASH_NOTE." >> "$OUTFILE"
wanted measure && i=$((i + 1))

# 3. eval throughput (the batched runner's benchmark)
dtype_of() { case "$1" in qwen*) echo bfloat16 ;; *) echo float16 ;; esac; }
for f in $TPUT_FAMILIES; do
  if [ $HAVE_TPUT = 0 ]; then
    note="$TPUT_MODULE not available: eval throughput skipped"
    record "throughput:$f" skipped 0 "$note"
    printf '%s\n' "" "## Eval throughput: $f" "" "skipped: $note" "" >> "$OUTFILE"
    continue
  fi
  if begin_step $i; then
    # a dry run checks the call: without lmms-eval's rows (they double its time; the 7B run skips them for its model)
    if [ $DRY = 1 ]; then args=(--family "$f" --dry-run --no-lmms)
    else args=(--family "$f" --size 7b --batches 1 8 32 --device cuda --dtype "$(dtype_of "$f")"); fi
    printf '%s\n' "" "## Eval throughput: $f" "" "\`python -m $TPUT_MODULE ${args[*]}\`" "" >> "$OUTFILE"
    t=$(now)
    timeout --kill-after=10 "$STEP_TIMEOUT" "$PY" -m "$TPUT_MODULE" "${args[@]}" | tee -a "$OUTFILE"
    RC=${PIPESTATUS[0]}
    ELAPSED=$(( $(now) - t ))
    case $RC in
      0) record "throughput:$f" ok "$ELAPSED" "" ;;
      124|137) record "throughput:$f" CUT "$ELAPSED" "killed at its ${STEP_TIMEOUT}s limit"
               printf '%s\n' "" "**CUT** at the step's ${STEP_TIMEOUT}-s limit." >> "$OUTFILE" ;;
      *) record "throughput:$f" FAILED "$ELAPSED" "rc $RC"; printf '%s\n' "" "**FAILED** (rc $RC)." >> "$OUTFILE" ;;
    esac
  fi
  i=$((i + 1))
done

TOTAL=$(( $(now) - T0 ))
printf '%s\n' "" "## Steps ($TOTAL s of a $BUDGET-s budget$([ $DRY = 1 ] && echo ', dry run'))" "" \
  "| step | status | s | note |" "|---|---|---|---|" "${STEPS[@]}" >> "$OUTFILE"
echo "[gpu.sh] total ${TOTAL}s of ${BUDGET}s; $([ $FAILED = 1 ] && echo 'SOME STEPS FAILED OR WERE CUT OR SKIPPED' || echo 'all steps done')"
echo "[gpu.sh] results: $OUTFILE (console log: $LOG)"
exit $FAILED
