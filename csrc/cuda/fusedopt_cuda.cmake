# CUDA part of the build of fusedopt._C (csrc/cuda/*.cu + csrc/bindings/cuda_bindings.cpp). Included by the top-level
# CMakeLists.txt after enable_language(CUDA) succeeded and after the _C target exists; defines FUSEDOPT_WITH_CUDA.
#
# Architectures: -DFUSEDOPT_CUDA_ARCHITECTURES="80-real;90" (CMake CUDA_ARCHITECTURES syntax) overrides; so does a
# user-given CMAKE_CUDA_ARCHITECTURES / $CUDAARCHS (the top level records that in FUSEDOPT_CUDA_ARCHS_FROM_USER before
# enable_language, which would otherwise fill in CMake's own default). The default is SASS for Turing (7.5), Ampere
# (8.0) and Hopper (9.0) plus PTX of 9.0 so newer GPUs (Blackwell) JIT-compile it. SASS of 8.0 runs on 8.6/8.7/8.9
# (same major version); their own SASS would only tune, at a third more compile time, so `pip install .` stays under
# three minutes on 2 cores. CUDA 13 removed Volta (7.0/7.2): 7.0 is added only when nvcc < 13.
set(FUSEDOPT_CUDA_ARCHITECTURES "" CACHE STRING
    "CUDA architectures of the kernels (empty: 75..90 SASS + 90 PTX, plus 70 with nvcc < 13)")

find_package(CUDAToolkit REQUIRED)

if(FUSEDOPT_CUDA_ARCHITECTURES)
  set(_fusedopt_cuda_archs "${FUSEDOPT_CUDA_ARCHITECTURES}")
elseif(FUSEDOPT_CUDA_ARCHS_FROM_USER)
  set(_fusedopt_cuda_archs "${CMAKE_CUDA_ARCHITECTURES}")
else()
  set(_fusedopt_cuda_archs 75-real 80-real 90-real 90-virtual)
  if(CMAKE_CUDA_COMPILER_VERSION VERSION_LESS 13.0)
    list(PREPEND _fusedopt_cuda_archs 70-real)
  endif()
endif()

file(GLOB FUSEDOPT_CUDA_SOURCES CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu")
target_sources(_C PRIVATE ${FUSEDOPT_CUDA_SOURCES} "${CMAKE_CURRENT_SOURCE_DIR}/csrc/bindings/cuda_bindings.cpp")
target_compile_definitions(_C PRIVATE FUSEDOPT_WITH_CUDA)
# The one rounding policy of the CPU kernels (CMakeLists.txt, -ffp-contract=off): no FMA contraction, IEEE
# round-to-nearest division and square root, denormals kept. The last three are nvcc's defaults without
# --use_fast_math; they are spelled out so the whole policy reads here instead of resting on defaults. The kernels are
# memory-bound, so none of it costs time.
# Device code is always fully optimised (ptxas -O3 is the default); -O for nvcc only affects host code.
target_compile_options(_C PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-lineinfo --fmad=false -prec-div=true -prec-sqrt=true -ftz=false>)
set_target_properties(_C PROPERTIES
    CUDA_ARCHITECTURES "${_fusedopt_cuda_archs}"
    CUDA_STANDARD 17
    CUDA_STANDARD_REQUIRED ON
    CUDA_RUNTIME_LIBRARY Static)
# Static runtime: the wheel needs only the NVIDIA driver, never a CUDA toolkit or libcudart.so.
target_link_libraries(_C PRIVATE CUDA::cudart_static)
message(STATUS "fusedopt: CUDA ${CMAKE_CUDA_COMPILER_VERSION} enabled, architectures: ${_fusedopt_cuda_archs}")
