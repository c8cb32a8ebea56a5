# On the GPU machine, from the repository root, after pack.py's folders are in /tmp/data and the
# keras wheels in /tmp/site: four trainings side by side (one GPU, 16 cores), results tarred to $OUT.
#   bash research/gpu/run_all.sh MINUTES
MM=$1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false
SH="--mixup 0.3 --masking --crops 2 --average 4 --augment gain,lowpass,tilt,noise --versions default --version-p 0.5 --teacher musicnn --teacher-target both --teacher-weight 1.0 --anneal 0.4 --epochs 400 --patience 40 --max-minutes $MM --name crnn-emotify-gtzan"
TO=$(python3 -c "print(int($MM*60+90))")
mkdir -p /tmp/runs
one() { name=$1; shift; timeout $TO python3 research/gpu/train_gpu.py /tmp/data /tmp/runs/$name -- $SH "$@" > /tmp/runs/$name.log 2>&1; echo "$name rc $?" >> /tmp/runs/$name.log; }
nvidia-smi --query-gpu=name,memory.used --format=csv
one A &
one B --short-crops 288 --short-share 0.75 &
one C --seed 1 &
one D --pairs 0.1 &
wait
python3 research/gpu/check_out.py /tmp/runs/[A-D]
cd /tmp/runs && tar czf $OUT/runs.tgz .
for f in *.log; do echo "== $f"; grep -v "absl\|cudart\|^I0000\|^W0000" $f | cut -c1-400 | tail -n 25; done
