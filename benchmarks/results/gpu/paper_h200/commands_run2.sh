# run 2, on the same warm H200 right after run 1: the methods run 1's time limit cut off, with GradAccum again
python3 benchmarks/gpu_paper.py --n_total 512 --steps 3 --warmup 1 --methods st-cmnrl,full,gradaccum --method_timeout 90 --out $OUT/gpu_paper_512_rest.json
