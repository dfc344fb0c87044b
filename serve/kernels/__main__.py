"""`python -m serve.kernels`: build (or find cached) the fused CPU LoRA kernel and say which."""

from serve.kernels import load

if __name__ == "__main__":
    module = load()
    print(f"fused CPU LoRA kernel: {module.__file__ if module else 'unavailable, torch ops are used'}")
