# Sourced by bootstrap.sh and build-llama-server.sh: the CMake flags of a portable llama.cpp
# build, in PORTABLE. A native build on a CPU that reports AMX segfaults in ggml's AMX matmul
# with Q8_0 models, and a native binary breaks when the image moves to another CPU.
# (deploy/llama-server.Dockerfile repeats them: its build context is deploy/ alone.)
case "$(uname -m)" in
  x86_64|amd64)
    # x86-64-v3 baseline (Haswell and newer): AVX2/FMA/F16C on, AVX-512 and AMX off.
    PORTABLE="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
  *)
    PORTABLE="-DGGML_NATIVE=OFF" ;;
esac
