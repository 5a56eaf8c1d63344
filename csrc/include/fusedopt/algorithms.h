// The one list of algorithms. FUSEDOPT_FOR_EACH_ALGORITHM generates the per-ISA kernel tables, the checked CPU and
// CUDA entry points and the pybind11 bindings; adding an algorithm is its math header, its include here and its name
// in the list.
#pragma once

#include "fusedopt/math/adadelta.h"
#include "fusedopt/math/adafactor.h"
#include "fusedopt/math/adagrad.h"
#include "fusedopt/math/adam.h"
#include "fusedopt/math/adamax.h"
#include "fusedopt/math/asgd.h"
#include "fusedopt/math/lamb.h"
#include "fusedopt/math/lion.h"
#include "fusedopt/math/muon.h"
#include "fusedopt/math/nadam.h"
#include "fusedopt/math/radam.h"
#include "fusedopt/math/rmsprop.h"
#include "fusedopt/math/rprop.h"
#include "fusedopt/math/sgd.h"

#define FUSEDOPT_FOR_EACH_ALGORITHM(X) \
  X(adam) X(sgd) X(rmsprop) X(adagrad) X(lion) X(lamb) X(adamax) X(radam) X(adadelta) X(rprop) X(nadam) X(asgd) \
      X(adafactor) X(muon)
