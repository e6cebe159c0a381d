import sys

for i in range(50):
    print(f"working line {i}")
print("FATAL: the loss went to nan at epoch 7", file=sys.stderr)
sys.exit(int(sys.argv[1]))
