// Vectorised RowAdam row update, included once per instruction set by pkm_cpu.cpp inside a namespace
// that defines F (a vector of kFloatLanes floats) and fload, fstore, fset1, fadd, fsub, fmul, fdiv,
// fsqrt and ffma(a, b, c) = a * b + c rounded once. Compiled under that set's target pragma: no std::
// or ATen templates here (see pkm_topk_simd.h).
//
// The arithmetic is adam_row_scalar's (pkm_cpu.cpp), operation for operation: IEEE division, square
// root and fused multiply-add round alike in every lane, so every path gives the same bits. The row's
// tail is adam_row_scalar itself (built with -march=native, so its multiply-adds are fused wherever a
// vector path can run: both need FMA).

inline void adam_row(float* w, float* m, float* v, const float* g, int64_t n, const AdamConstants& c) {
  const F one_minus_beta1 = fset1(c.one_minus_beta1), beta2 = fset1(c.beta2),
          one_minus_beta2 = fset1(c.one_minus_beta2), bias2_sqrt = fset1(c.bias2_sqrt), eps = fset1(c.eps),
          minus_step_size = fset1(-c.step_size);
  int64_t d = 0;
  for (; d + kFloatLanes <= n; d += kFloatLanes) {
    const F gd = fload(g + d), md = fload(m + d);
    const F mean = ffma(fsub(gd, md), one_minus_beta1, md);
    const F var = ffma(fload(v + d), beta2, fmul(fmul(one_minus_beta2, gd), gd));
    fstore(m + d, mean);
    fstore(v + d, var);
    const F update = fdiv(mean, fadd(fdiv(fsqrt(var), bias2_sqrt), eps));
    fstore(w + d, ffma(update, minus_step_size, fload(w + d)));
  }
  adam_row_scalar(w + d, m + d, v + d, g + d, n - d, c);  // the last n % kFloatLanes floats
}
