// dynloss native CPU kernels: one streaming pass forward, one elementwise pass backward.
//
// Compiled at first use by dynloss/kernels/native/build.py (g++/clang++ -O3 -march=native
// -fopenmp) and called through ctypes; no Python or torch headers are needed. The formulas
// are those of dynloss._math (the reference backend): every kernel is tested against it.
//
// Binary / multilabel: x and target are (rows, M), rows = N*C, contiguous. Multiclass: x is
// (N, C, M), target (N, M) class indices. The forward pass returns, per row (binary) or per
// (sample, class) (multiclass), the region sums I = sum p*g, P = sum p, G = sum g over kept
// elements, and the sum S of the per-element (focal-modulated, alpha-weighted) cross-entropy
// with the number of kept elements. It also writes what the backward pass needs, so that pass
// is plain arithmetic: for region losses the probabilities p (multiclass) or, binary, the
// slope dp/dx signed by the target (so that backward reads the target only for soft labels);
// for pixel losses the slope d(loss)/dx of each element (0 where ignored). The backward pass
// writes
//     dL/dx = [ (gp + gi*g) * dp/dx ] (0 where ignored)  +  gs * slope
// for the upstream gradients gi = dL/dI, gp = dL/dP (per row / per (sample, class)) and
// gs = dL/dS.
//
// TopK: the forward pass also writes each element's loss (binary/multilabel per (N, C, M)
// element, multiclass per (N, M) pixel; -inf where ignored), and a second call selects the n
// largest by a radix select on their bit patterns (histograms of 16, 8 and 8 bits, each over
// the keys in the previous one's threshold bin; no sort), sums them, and zeroes the
// saved slopes of the elements it did not select, so that backward stays one pass (and, for
// reduction="none", their losses, which are then the result).
//
// Precision: every kernel is a template over F, the type the input is computed in: float
// for float32 input (and the float32 copy of a 16-bit one), double for float64 input (Args.real;
// its buffers, per-class values and upstream gradients are double too; TopK's selection
// keys double losses by 64-bit patterns).
//
// Determinism: the work is cut into fixed chunks whatever the thread count; each chunk sums
// in F over blocks of at most 512 elements (an OpenMP simd reduction), the block sums go
// into a double per chunk, and chunks are added in order. Same input, same bits, for any
// number of threads.
//
// Math: exp, log and expm1 are written out below (Cephes-style polynomials, < 2 ulp; for
// double, Taylor and atanh series to double precision) so that the loops vectorise without
// -ffast-math and keep IEEE semantics (inf, NaN, subnormals).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

// AVX-512 (F and DQ): the binary region forward pass has a hand-vectorised loop (see
// binary_region_logits_avx512); every other loop is portable C++ vectorised by the compiler.
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define DL_AVX512 1
#else
#define DL_AVX512 0
#endif

#define DL_INLINE inline __attribute__((always_inline))

namespace {

constexpr int64_t kChunk = 16384;     // binary: elements per task
constexpr int64_t kBlock = 512;       // elements per float accumulation block
constexpr int64_t kClassChunk = 1024; // multiclass: pixels per task (and per block)
constexpr int64_t kParallelMin = 32768;  // smaller inputs run on the calling thread only
constexpr float kLogClamp = -100.0f;  // torch.nn.BCELoss's clamp of log-probabilities

enum Pixel : int { kPixelNone = 0, kPixelBce = 1, kPixelFocal2 = 2, kPixelFocal = 3 };
enum TargetType : int { kFloat32 = 0, kUInt8 = 1, kInt64 = 2, kFloat64 = 3 };
enum RealType : int { kReal32 = 0, kReal64 = 1 };

// Bit-level helpers for float and double (F names the type an input is computed in: every
// loop is instantiated for both, float64 inputs computed in double)
template <typename F> struct BitsOf;
template <> struct BitsOf<float> { using type = uint32_t; };
template <> struct BitsOf<double> { using type = uint64_t; };

template <typename F>
DL_INLINE typename BitsOf<F>::type as_bits(F f) {
  typename BitsOf<F>::type i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}
template <typename F>
DL_INLINE F from_bits(typename BitsOf<F>::type i) { F f; std::memcpy(&f, &i, sizeof f); return f; }
DL_INLINE float as_float(uint32_t i) { return from_bits<float>(i); }
DL_INLINE double as_double(uint64_t i) { return from_bits<double>(i); }
template <typename F>
DL_INLINE F max_f(F a, F b) { return a > b ? a : b; }
// the sign bit of F's bit pattern
template <typename F>
constexpr typename BitsOf<F>::type kSignBit = typename BitsOf<F>::type{1} << (8 * sizeof(F) - 1);
template <typename F>
DL_INLINE F abs_f(F a) { return from_bits<F>(as_bits(a) & ~kSignBit<F>); }
// c ? a : b as a bit select: both arms formed, nothing loaded or stored under a mask (GCC
// turns some conditional expressions in `omp simd` reduction loops into masked moves)
template <typename F>
DL_INLINE F pick(bool c, F a, F b) {
  using Bits = typename BitsOf<F>::type;
  const Bits m = Bits{0} - static_cast<Bits>(c);
  return from_bits<F>((as_bits(a) & m) | (as_bits(b) & ~m));
}
template <typename F>
DL_INLINE bool sign_bit(F a) { return (as_bits(a) & kSignBit<F>) != 0; }

// |x| <= kFinite<F>: x is finite (false for NaN)
template <typename F> constexpr F kFinite = std::numeric_limits<F>::max();

// The exponential's constants, shared by exp_reduced and the AVX-512 loop: 1 / ln 2, ln 2 in
// two parts (Cody-Waite: n * kLn2High is exact), the degree-6 polynomial (Cephes expf), and
// where exp_nonpositive flushes to 0 (below e^-87.33, under 2^-126).
constexpr float kLog2E = 1.44269504088896341f;
constexpr float kLn2High = 0.693359375f;
constexpr float kLn2Low = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
constexpr float kExpFlush = 87.33f;

// n = round(x / ln 2) by the 1.5 * 2^23 trick (exact for |n| < 2^22).
DL_INLINE float round_to_log2(float x) {
  return (x * kLog2E + 12582912.0f) - 12582912.0f;
}

// e^(x - n ln 2) for n = round_to_log2(x): |x - n ln 2| <= ln2 / 2, where a degree-6
// polynomial is exact to float precision (Cephes expf).
DL_INLINE float exp_reduced(float x, float n) {
  float r = x - n * kLn2High;
  r = r - n * kLn2Low;
  float z = r * r;
  float y = kExpPoly[0];
  for (int k = 1; k < 6; ++k) y = y * r + kExpPoly[k];
  return y * z + r + 1.0f;
}

// 2^n for integer-valued n in [-126, 127], built from its exponent bits.
DL_INLINE float pow2(float n) {
  return as_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

// e^x. Overflows to inf above ~88.72, goes subnormal then 0 below ~-87.3; NaN stays NaN.
DL_INLINE float exp_f(float x) {
  float xc = x < -104.0f ? -104.0f : x;
  xc = xc > 89.0f ? 89.0f : xc;
  const float n = round_to_log2(xc);
  // 2^n as two normal factors, so subnormal and overflowing results come out right
  const float half = static_cast<float>(static_cast<int32_t>(n) >> 1);
  return exp_reduced(xc, n) * pow2(half) * pow2(n - half);
}

// e^x for x <= 0 with results below 2^-126 (x < -87.33) flushed to 0: one clamp and one
// scale factor fewer than exp_f. For probabilities only, where such values do not count.
DL_INLINE float exp_nonpositive(float x) {
  const bool flushed = x < -kExpFlush;
  const float xc = flushed ? 0.0f : x;
  const float n = round_to_log2(xc);
  return flushed ? 0.0f : exp_reduced(xc, n) * pow2(n);
}

// log(x) for finite x > 0 (subnormals included). Callers handle x <= 0.
DL_INLINE float log_f(float x) {
  bool tiny = x < 1.17549435e-38f;
  float xs = tiny ? x * 8388608.0f : x;  // scale subnormals by 2^23
  uint32_t bits = as_bits(xs);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xffu) - 126;  // xs = m 2^e, m in [0.5, 1)
  float m = as_float((bits & 0x007fffffu) | 0x3f000000u);
  bool small = m < 0.707106781186547524f;
  float ef = static_cast<float>(e) - (tiny ? 23.0f : 0.0f) - (small ? 1.0f : 0.0f);
  float f = small ? (m + m - 1.0f) : (m - 1.0f);
  float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  float r = f + y;
  return r + ef * 0.693359375f;
}

// log(1 + y) for y in [0, 1] (the softplus tail log(1 + e^{-|x|})) as y P(y), P of degree 10
// fitted to log1p(y) / y on Chebyshev nodes of [0, 1]: under 3 ulp relative everywhere, full
// relative precision at tiny y (subnormals included), ten FMAs and no log, no division.
DL_INLINE float log1p_f(float y) {
  float p = 0.0020376904867589474f;
  p = p * y - 0.013444830663502216f;
  p = p * y + 0.04155762121081352f;
  p = p * y - 0.08253533393144608f;
  p = p * y + 0.12425103038549423f;
  p = p * y - 0.1610863208770752f;
  p = p * y + 0.19891537725925446f;
  p = p * y - 0.24987392127513885f;
  p = p * y + 0.33332568407058716f;
  p = p * y - 0.4999998211860657f;
  p = p * y + 1.0f;
  return y * p;
}

// 1 - e^{-b} for b >= 0, without cancellation at small b; also returns e^{-b}.
DL_INLINE float one_minus_exp_neg(float b, float& e) {
  e = exp_f(-b);
  float t = -b;  // Taylor series of -expm1(t) for |t| < 0.35 (error < 2e-8 relative)
  float s = 1.0f / 5040.0f;
  s = s * t + 1.0f / 720.0f;
  s = s * t + 1.0f / 120.0f;
  s = s * t + 1.0f / 24.0f;
  s = s * t + 1.0f / 6.0f;
  s = s * t + 0.5f;
  s = s * t + 1.0f;
  float series = -(s * t);
  return b < 0.35f ? series : 1.0f - e;
}

// q^gamma for q in [0, 1] and gamma > 0 (general exponent).
DL_INLINE float pow_f(float q, float gamma) {
  return q > 0.0f ? exp_f(gamma * log_f(q > 0.0f ? q : 1.0f)) : 0.0f;
}

// ------------------------------------------------------------------- double precision
// The same functions for float64 inputs, to double precision (< 2 ulp, measured against
// 120-bit arithmetic): exp by the same reduction with Taylor terms to r^13; log by
// log(1 + f) = 2 atanh(f / (2 + f)) with the atanh series to s^21; log1p as log(1 + y) plus
// the rounding of 1 + y divided by it; 1 - e^-b by its Taylor series below 0.35.
constexpr double kLog2ED = 0x1.71547652b82fep0;
constexpr double kLn2HighD = 0x1.62e42fee00000p-1;   // 32 significant bits
constexpr double kLn2LowD = 0x1.a39ef35793c76p-33;
constexpr double kShifterD = 0x1.8p52;               // 1.5 * 2^52
constexpr double kExpFlushD = 708.39;

// 1 / k! for k = 0..16
constexpr double kInverseFactorial[17] = {
    1.0, 1.0, 1.0 / 2.0, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0,
    1.0 / 40320.0, 1.0 / 362880.0, 1.0 / 3628800.0, 1.0 / 39916800.0, 1.0 / 479001600.0,
    1.0 / 6227020800.0, 1.0 / 87178291200.0, 1.0 / 1307674368000.0, 1.0 / 20922789888000.0};

// sum_{k = FIRST}^{LAST} r^(k - FIRST) / k! by Horner's rule: e^r's Taylor series from its
// term of degree FIRST on, divided by r^FIRST
template <int FIRST, int LAST>
DL_INLINE double exp_series(double r) {
  double y = kInverseFactorial[LAST];
  for (int k = LAST - 1; k >= FIRST; --k) y = y * r + kInverseFactorial[k];
  return y;
}

DL_INLINE double round_to_integer(double x) { return (x + kShifterD) - kShifterD; }
// 2^n for integer-valued n in [-1022, 1023]: its integer from the shifter's low bits
DL_INLINE double pow2(double n) {
  const uint64_t k = as_bits(n + kShifterD) - as_bits(kShifterD);  // n, two's complement
  return as_double((k + 1023u) << 52);
}
DL_INLINE double exp_reduced(double x, double n) {
  double r = x - n * kLn2HighD;
  r = r - n * kLn2LowD;
  const double z = r * r;
  // e^r = 1 + r + r^2 (1/2 + r/6 + ...): Taylor terms to r^13 (|r| <= ln2/2: the first term
  // left out, r^14/14!, is below 2^-60)
  const double y = exp_series<2, 13>(r);
  return y * z + r + 1.0;
}
DL_INLINE double exp_f(double x) {
  double xc = x < -1100.0 ? -1100.0 : x;
  xc = xc > 710.0 ? 710.0 : xc;
  const double n = round_to_integer(xc * kLog2ED);
  const double half = round_to_integer(n * 0.5);
  return exp_reduced(xc, n) * pow2(half) * pow2(n - half);
}
DL_INLINE double exp_nonpositive(double x) {
  const bool flushed = x < -kExpFlushD;
  const double xc = flushed ? 0.0 : x;
  const double n = round_to_integer(xc * kLog2ED);
  return flushed ? 0.0 : exp_reduced(xc, n) * pow2(n);
}
// log(x) = ef ln 2 + (f - c) for finite x > 0 (subnormals included): the exponent ef, the
// reduced argument f and the correction c of log(1 + f) = f - c (log_f and log_parts add
// them up)
DL_INLINE void log_terms(double x, double& ef, double& f, double& c) {
  const bool tiny = x < 0x1p-1022;
  const double xs = tiny ? x * 0x1p52 : x;
  const uint64_t bits = as_bits(xs);
  const double e = static_cast<double>(static_cast<int64_t>((bits >> 52) & 0x7ffu)) - 1022.0;
  const double m = as_double((bits & 0x000fffffffffffffu) | 0x3fe0000000000000u);  // [0.5, 1)
  const bool small = m < 0.70710678118654752440;
  ef = e - (tiny ? 52.0 : 0.0) - (small ? 1.0 : 0.0);
  f = small ? (m + m - 1.0) : (m - 1.0);  // in [sqrt(1/2) - 1, sqrt(2) - 1)
  // log(1 + f) = 2 atanh(s), s = f / (2 + f), |s| <= 0.1716: 2s + s R(s^2),
  // R(z) = sum_{k>=1} 2 z^k / (2k + 1) to z^10 (the next term is below 2^-62 of the result)
  const double s = f / (2.0 + f);
  const double z = s * s;
  double R = 2.0 / 21.0;
  R = R * z + 2.0 / 19.0;
  R = R * z + 2.0 / 17.0;
  R = R * z + 2.0 / 15.0;
  R = R * z + 2.0 / 13.0;
  R = R * z + 2.0 / 11.0;
  R = R * z + 2.0 / 9.0;
  R = R * z + 2.0 / 7.0;
  R = R * z + 2.0 / 5.0;
  R = R * z + 2.0 / 3.0;
  R = R * z;
  const double hfsq = 0.5 * f * f;
  // 2s + s R = f - (hfsq - s (hfsq + R)) (2s = f - s f and s f = hfsq (1 - s))
  c = hfsq - s * (hfsq + R);
}

// log(x) for finite x > 0 (subnormals included)
DL_INLINE double log_f(double x) {
  double ef, f, c;
  log_terms(x, ef, f, c);
  return ef * kLn2HighD + ((f - c) + ef * kLn2LowD);
}

// a + b, and in err what its rounding lost (Knuth's two-sum: exact without contraction of
// additions, which no flag of the build allows)
DL_INLINE double two_sum(double a, double b, double& err) {
  const double sum = a + b;
  const double b_part = sum - a;
  err = (a - (sum - b_part)) + (b - b_part);
  return sum;
}

// log(x) as hi + lo for finite x > 0, |lo| within an ulp of hi: lo holds what hi's three
// roundings lost (for the power, whose exponential multiplies an error of the log by
// |gamma log x|, up to ~700)
DL_INLINE double log_parts(double x, double& lo) {
  double ef, f, c, lost_f, lost_low, lost_high;
  log_terms(x, ef, f, c);
  const double f_part = two_sum(f, -c, lost_f);
  const double low = two_sum(f_part, ef * kLn2LowD, lost_low);
  const double hi = two_sum(ef * kLn2HighD, low, lost_high);
  lo = lost_f + lost_low + lost_high;
  return hi;
}
// log(1 + y) for y >= 0: log(u) of u = 1 + y, plus the rounding of u divided by u
DL_INLINE double log1p_f(double y) {
  const double u = 1.0 + y;
  return log_f(u) + (y - (u - 1.0)) / u;
}
DL_INLINE double one_minus_exp_neg(double b, double& e) {
  e = exp_f(-b);
  const double t = -b;  // -expm1(t) for |t| < 0.35 by its Taylor series to t^16
  const double s = exp_series<1, 16>(t);
  const double series = -(s * t);
  return b < 0.35 ? series : 1.0 - e;
}

// max(log p, -100), the clamped log-probability of the reference (p in [0, 1]), in F.
template <typename F>
DL_INLINE F clamped_log(F p) {
  const F clamp = kLogClamp;
  const F l = p > F(0) ? log_f(p > F(0) ? p : F(1)) : clamp;
  return max_f(l, clamp);
}

// w times the slope of clamped_log, formed as the quotient w / p (0 where the log is
// clamped), as autograd forms it: a zero w gives 0 even where 1/p overflows (p below
// ~2.9e-39 in float), where w * (1/p) would be 0 * inf = NaN.
template <typename F>
DL_INLINE F clamped_log_ratio(F w, F p) {
  const F clamp = kLogClamp;
  const F l = p > F(0) ? log_f(p > F(0) ? p : F(1)) : clamp;
  return l > clamp ? w / p : F(0);
}

// q^gamma = e^(gamma (hi + lo)) = e^p (1 + err) for p = gamma hi rounded and err the rest
// (|err| ~ 2^-53 |p|: its square is below double's precision)
DL_INLINE double pow_f(double q, double gamma) {
  double lo;
  const double hi = log_parts(q > 0.0 ? q : 1.0, lo);
  const double p = gamma * hi;
  const double err = std::fma(gamma, hi, -p) + gamma * lo;
  return q > 0.0 ? exp_f(p) * (1.0 + err) : 0.0;
}

// focal modulation q^gamma and its slope factor d/db (q^gamma b) / 1 = q^gamma (1 + gamma e b/q)
template <int PIXEL, typename F>
DL_INLINE F focal_power(F q, F gamma) {
  if (PIXEL == kPixelFocal2) return q * q;
  if (PIXEL == kPixelFocal) return pow_f(q, gamma);
  return F(1);
}

// target == ignore_index, compared as torch compares a tensor with a Python int
template <typename T>
DL_INLINE bool is_ignored(T v, int64_t ignore) { return static_cast<int64_t>(v) == ignore; }
template <>
DL_INLINE bool is_ignored<float>(float v, int64_t ignore) {
  return v == static_cast<float>(ignore);
}
template <>
DL_INLINE bool is_ignored<double>(double v, int64_t ignore) {
  return v == static_cast<double>(ignore);
}

// ------------------------------------------------------------------------------ arguments
// The input's type (Args.real) is that of every buffer of x's elements or of per-class or
// per-channel values: x, class_alpha, probabilities, slope, grad_intersection,
// grad_prediction, grad, loss and pos_weight hold float (kReal32) or double (kReal64).
struct Args {
  const void* x;
  const void* target;
  int64_t target_type;   // TargetType
  int64_t n;             // samples
  int64_t c;             // channels / classes
  int64_t m;             // elements per (sample, channel)
  int64_t logits;        // 1: x holds logits, 0: probabilities
  int64_t has_ignore;
  int64_t ignore_index;
  int64_t want_region;
  int64_t pixel;         // Pixel
  int64_t has_alpha;
  double gamma;
  double alpha;          // binary/multilabel: weight of positives
  const void* class_alpha;  // multiclass: C weights (when has_alpha)
  int64_t threads;
  // forward: written for backward (x's shape); backward: read
  void* probabilities;  // p (region losses); null in forward: no gradient wanted
  void* slope;          // d(per-element loss)/dx, 0 where ignored (pixel losses); ditto
  // backward
  const void* grad_intersection;  // (N, C)
  const void* grad_prediction;    // (N, C)
  double grad_pixel;
  void* grad;                       // x's shape
  // forward outputs
  double* region;     // (N*C, 3): I, P, G
  double* pixel_out;  // 3: S, max(count, 1), count (kept elements); TopK selection: 1: the
                      //    sum of the selected losses
  double* check;      // 4, each nonzero when there is any (a count of elements, or of
                      //    chunks where the AVX-512 loop ran): kept targets out of range,
                      //    kept inputs not finite (logits) or outside [0, 1] (probabilities),
                      //    kept binary targets other than 0 and 1 (soft labels), kept slopes
                      //    that overflowed (probabilities whose 1/p is beyond float32)
  // backward, binary: 1 when the forward counted no soft label (check[2] == 0), so the
  // signed slopes it saved hold the targets and backward need not read them
  int64_t hard_targets;
  // forward: each element's loss is written here (binary/multilabel (N, C, M), multiclass
  // (N, M); ignored_loss where ignored); null when not wanted. TopK's selection reads them;
  // reduction="none" returns them.
  void* loss;
  // TopK, selection: how many of the losses to select (0 <= topk <= their number)
  int64_t topk;
  // backward: the region gradient is region_scale times the one of grad_intersection and
  // grad_prediction, which hold C values (one per class, for every sample) when pooled is 1
  // and N*C (one per (sample, class)) when it is 0
  double region_scale;
  int64_t pooled;
  // 1: only the portable loops, never a hand-vectorised one (tests compare the two)
  int64_t portable_loops;
  // binary/multilabel pixel losses: BCE's pos_weight, the weight of the positives' term, one
  // per channel (C values, read at row % c); null: 1 (unweighted)
  const void* pos_weight;
  // multiclass pixel losses with class_alpha: 1: the count is the sum of the kept pixels'
  // class weights (the normaliser of CrossEntropyLoss(weight=...)'s mean), not their number
  int64_t weighted_count;
  // forward with loss: the value written for an ignored element (-inf for TopK's selection,
  // which never picks it; 0 for reduction="none")
  double ignored_loss;
  // RealType: the type of x and of the buffers above (float64 inputs are computed in double)
  int64_t real;
  // TopK, selection: 1: the losses outside the selection are zeroed in `loss` (TopK's
  // reduction="none", whose result they are; ignored ones too)
  int64_t zero_unselected;
};

constexpr float kSaturatedB = 100.0f;

// The focal loss q^gamma b of the cross-entropy b (b itself for BCE), q = 1 - e^{-b}, and its
// slope factor d/db (q^gamma b) = q^gamma (1 + gamma e^{-b} b / q) (b/q -> 1 at q = 0; 1 for
// BCE), sharing one exponential and one power.
template <int PIXEL, typename F>
DL_INLINE F focal_terms(F b, F gamma, F& factor) {
  if (PIXEL == kPixelBce) {
    factor = F(1);
    return b;
  }
  F eb;
  const F q = one_minus_exp_neg(b, eb);
  const F power = focal_power<PIXEL>(q, gamma);
  // b clamped to kSaturatedB (dynloss._math.SATURATED_B): e^{-b} b is 0, not 0 * inf, at b = inf
  const F saturated = kSaturatedB;
  const F ratio = q > F(0) ? (b < saturated ? b : saturated) / q : F(1);
  factor = power * (F(1) + gamma * eb * ratio);
  return power * b;
}

// Software prefetch of the streams a chunk reads: the hardware prefetcher alone leaves the
// compute-heavy loops waiting on memory once the inputs are out of the cache (measured: the
// forward pass over 8 MiB cold took twice as long as a dot product over the same data, 1.5x with
// these prefetches). Each block asks for the block kPrefetch elements ahead; a chunk first
// asks for its first kPrefetch elements. Not for a short range (a short row's, where a task
// takes whole rows): its ~300 prefetches, mostly of the next rows, cost more than the row.
constexpr int64_t kPrefetch = 2048;
DL_INLINE bool prefetching(int64_t begin, int64_t end) { return end - begin > kChunk / 2; }

template <typename T>
DL_INLINE void prefetch_range(const T* p, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(p);
  const int64_t size = count * static_cast<int64_t>(sizeof(T));
  for (int64_t offset = 0; offset < size; offset += 64) __builtin_prefetch(bytes + offset);
}

// The prefetches of a binary forward loop: the first kPrefetch elements of a chunk up front
// (at = begin, count = kPrefetch), then each block's, kPrefetch ahead (at = b0 + kPrefetch,
// count = kBlock; past the end: a prefetch never faults).
template <typename F, typename T>
DL_INLINE void prefetch_inputs(const F* x, const T* t, int64_t at, int64_t count) {
  prefetch_range(x + at, count);
  prefetch_range(t + at, count);
}

constexpr int kPartBinary = 9;  // I P G S count badT badX soft overflow

// ------------------------------------------------------------------ binary / multilabel
// IGNORE: whether ignore_index is set (without it, every element is kept and the loop does
// not test for it). WEIGHTED: a.pos_weight is set (the positives' term of the cross-entropy
// weighed by the row's channel's weight w: (1 - g) softplus(x) + w g softplus(-x)).
template <typename F, typename T, bool LOGITS, bool REGION, int PIXEL, bool IGNORE, bool WEIGHTED>
static void binary_forward_chunk(const Args& a, int64_t row, int64_t begin, int64_t end,
                                 double* out) {
  const F* x = static_cast<const F*>(a.x) + row * a.m;
  const T* t = static_cast<const T*>(a.target) + row * a.m;
  // what backward needs goes to the caller's buffers; without them (no gradient wanted) to a
  // scratch block, so the loop stays branch-free
  F scratch_p[kBlock], scratch_slope[kBlock];
  // region terms: the binary kernels save d = dp/dx (p (1 - p) from logits, 1 from
  // probabilities; 0 where ignored) with the target in its sign bit (-d where the target is
  // 1), so that backward reads one buffer, not the target too (when all targets are hard)
  F* save_p = REGION && a.probabilities ? static_cast<F*>(a.probabilities) + row * a.m : nullptr;
  F* save_slope = PIXEL != kPixelNone && a.slope ? static_cast<F*>(a.slope) + row * a.m : nullptr;
  F scratch_loss[kBlock];
  F* save_loss = PIXEL != kPixelNone && a.loss ? static_cast<F*>(a.loss) + row * a.m : nullptr;
  const F ignored_loss = static_cast<F>(a.ignored_loss);
  const int64_t ignore = a.ignore_index;
  const F gamma = static_cast<F>(a.gamma);
  const F w1 = a.has_alpha ? static_cast<F>(2.0 * a.alpha - 1.0) : F(0);
  const F w0 = a.has_alpha ? static_cast<F>(1.0 - a.alpha) : F(1);
  const F pos_weight = WEIGHTED ? static_cast<const F*>(a.pos_weight)[row % a.c] : F(1);
  double dI = 0, dP = 0, dG = 0, dS = 0, dN = 0, dBad = 0, dBadX = 0, dSoft = 0, dOver = 0;
  const bool prefetch = prefetching(begin, end);
  if (prefetch) prefetch_inputs(x, t, begin, kPrefetch);
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < end ? b0 + kBlock : end;
    if (prefetch) prefetch_inputs(x, t, b0 + kPrefetch, kBlock);
    F* dst_p = save_p ? save_p + b0 : scratch_p;
    F* dst_slope = save_slope ? save_slope + b0 : scratch_slope;
    F* dst_loss = save_loss ? save_loss + b0 : scratch_loss;
    // sums in F, counts in float (exact: a block holds at most kBlock < 2^24 elements)
    F sI = 0, sP = 0, sG = 0, sS = 0;
    float sN = 0, bad = 0, badx = 0, soft = 0, over = 0;
#pragma omp simd reduction(+ : sI, sP, sG, sS, sN, bad, badx, soft, over)
    for (int64_t i = b0; i < b1; ++i) {
      const F xv = x[i];
      const T tv = t[i];
      const bool keep = !(IGNORE && is_ignored(tv, ignore));
      const F g = keep ? static_cast<F>(tv) : F(0);
      // g (1 - g): negative or NaN for a target outside [0, 1], nonzero for a soft label
      // (0 for ignored elements, which have g = 0)
      const F spread = g - g * g;
      bad += !(spread >= F(0)) ? 1.0f : 0.0f;
      // a kept input that is not finite (logits) or outside [0, 1] (probabilities) makes the
      // loss NaN (counted here, applied by the caller)
      const bool valid_x = LOGITS ? (abs_f(xv) <= kFinite<F>) : ((xv >= F(0)) & (xv <= F(1)));
      badx += (keep & !valid_x) ? 1.0f : 0.0f;
      F p, e = 0, pq = 1, inv = 1;  // pq: p (1 - p) = dp/dx from logits
      if (LOGITS) {
        // region sums only need p: probabilities below 2^-126 may be flushed to 0 there;
        // the cross-entropy keeps them (softplus(-90) must keep its digits)
        e = PIXEL == kPixelNone ? exp_nonpositive(-abs_f(xv)) : exp_f(-abs_f(xv));
        inv = F(1) / (F(1) + e);
        const F small = e * inv;  // min(p, 1 - p)
        p = xv >= F(0) ? inv : small;
        pq = small * inv;  // no cancellation in 1 - p near p = 1
      } else {
        p = xv;
      }
      if (REGION) {
        const F pk = keep ? p : F(0);  // selected, not multiplied: a NaN there is ignored
        sI += pk * g;
        sP += pk;
        sG += g;
        const F d = keep ? pq : F(0);
        dst_p[i - b0] = g == F(1) ? -d : d;
        soft += spread != F(0) ? 1.0f : 0.0f;
      }
      if (PIXEL != kPixelNone) {
        // gw: the positives' share, weighed (g itself unweighted: the same expressions)
        const F gw = WEIGHTED ? pos_weight * g : g;
        const F b = !LOGITS ? -(gw * clamped_log(p) + (F(1) - g) * clamped_log(F(1) - p))
                    : WEIGHTED ? (F(1) - g) * (max_f(xv, F(0)) + log1p_f(e))
                                     + gw * (max_f(-xv, F(0)) + log1p_f(e))
                               : (max_f(xv, F(0)) - xv * g) + log1p_f(e);
        const F w = g * w1 + w0;
        F factor;
        const F loss = focal_terms<PIXEL>(b, gamma, factor) * w;
        const F coef = factor * w;
        // probabilities: the coefficient goes into the quotients' numerators; where 1/p
        // overflows the slope is +-inf, counted (the caller then forms the gradient as
        // autograd does, (upstream * coef) / p, since upstream * inf is not that)
        // logits: p - g as (1 - g) p - g (1 - p), 1 - p = min or max of (p, 1 - p) by the
        // sign: exact for hard labels where the sigmoid saturates (p - 1 would lose the
        // digits of 1 - p)
        const F q = xv >= F(0) ? e * inv : inv;  // 1 - p
        const F slope = LOGITS ? ((F(1) - g) * p - gw * q) * coef
                               : clamped_log_ratio((F(1) - g) * coef, F(1) - p)
                                     - clamped_log_ratio(gw * coef, p);
        if (!LOGITS) over += (keep & (abs_f(slope) > kFinite<F>)) ? 1.0f : 0.0f;
        sS += keep ? loss : F(0);
        sN += keep ? 1.0f : 0.0f;
        dst_slope[i - b0] = keep ? slope : F(0);
        dst_loss[i - b0] = keep ? loss : ignored_loss;
      }
    }
    dI += sI; dP += sP; dG += sG; dS += sS; dN += sN; dBad += bad; dBadX += badx;
    dSoft += soft; dOver += over;
  }
  out[0] = dI; out[1] = dP; out[2] = dG; out[3] = dS; out[4] = dN; out[5] = dBad;
  out[6] = dBadX; out[7] = dSoft; out[8] = dOver;
}

#if DL_AVX512
// binary_forward_chunk for the commonest call, by hand for AVX-512: region sums only, from
// logits, float32 targets, no ignore_index (Dice, IoU and Tversky on a binary or multilabel
// batch). The arithmetic is the portable loop's: e = e^-|x| (the same reduction and
// polynomial, flushed to 0 below e^-87.33), p = 1/(1 + e) or e/(1 + e) by the sign of x,
// the saved slope p (1 - p) negated where the target is 1. Only the 2^n of e is applied by
// one scalef instead of building its exponent bits, and the three checks are maxima of bit
// patterns instead of counts (check values are "nonzero: some"): 37 vector instructions per
// 16 elements where the compiler's loop has 48 (GCC 12), measured ~10 % faster
// forward+backward at (32, 1, 256, 256) with 2 threads (docs/kernels.md). Float sums per
// block of kBlock elements in 16 lanes, then to double: deterministic, like the portable loop
// (whose lanes sum in another order: the two agree to float rounding, not bit for bit).
template <bool SAVE>
static void binary_region_logits_avx512(const float* x, const float* t, float* save,
                                        int64_t begin, int64_t end, double* out) {
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i spread_max = _mm512_setzero_si512(), x_max = _mm512_setzero_si512();
  double dI = 0, dP = 0, dG = 0;
  const bool prefetch = prefetching(begin, end);
  if (prefetch) prefetch_inputs(x, t, begin, kPrefetch);
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < end ? b0 + kBlock : end;
    if (prefetch) prefetch_inputs(x, t, b0 + kPrefetch, kBlock);
    __m512 sI = zero, sP = zero, sG = zero;
    for (int64_t i = b0; i < b1; i += 16) {
      // the lanes inside [b0, b1); the others load 0 (x = 0, g = 0) and store nothing
      const __mmask16 lane = i + 16 <= b1 ? static_cast<__mmask16>(0xffff)
                                          : static_cast<__mmask16>((1u << (b1 - i)) - 1u);
      const __m512 xv = _mm512_maskz_loadu_ps(lane, x + i);
      const __m512 g = _mm512_maskz_loadu_ps(lane, t + i);
      const __m512i ax_bits = _mm512_and_si512(_mm512_castps_si512(xv), abs_mask);
      x_max = _mm512_max_epu32(x_max, ax_bits);  // above kFinite<float>'s bits: inf or NaN
      const __m512 ax = _mm512_castsi512_ps(ax_bits);
      // e^-|x| as exp_nonpositive: n = round(-|x| / ln 2), e^(-|x| - n ln 2) by
      // exp_reduced's polynomial, times 2^n; 0 below -87.33 (and for NaN, flagged above)
      const __mmask16 live = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(kExpFlush), _CMP_LE_OQ);
      const __m512 y = _mm512_sub_ps(zero, ax);
      const __m512 n = _mm512_roundscale_ps(
          _mm512_mul_ps(y, _mm512_set1_ps(kLog2E)),
          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), y);
      r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), r);
      const __m512 z = _mm512_mul_ps(r, r);
      __m512 q = _mm512_set1_ps(kExpPoly[0]);
      for (int k = 1; k < 6; ++k) q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(kExpPoly[k]));
      q = _mm512_add_ps(_mm512_fmadd_ps(q, z, r), one);
      const __m512 e = _mm512_maskz_scalef_ps(live, q, n);
      const __m512 inv = _mm512_div_ps(one, _mm512_add_ps(one, e));
      const __m512 small = _mm512_mul_ps(e, inv);  // min(p, 1 - p)
      // x < 0 by its sign bit: for x = -0 both choices are 1/2
      const __mmask16 negative = _mm512_movepi32_mask(_mm512_castps_si512(xv));
      const __m512 p = _mm512_mask_blend_ps(negative, inv, small);
      sI = _mm512_fmadd_ps(p, g, sI);
      sP = _mm512_mask_add_ps(sP, lane, sP, p);  // lanes past the end hold p(0) = 1/2
      sG = _mm512_add_ps(sG, g);
      // g (1 - g), -0 made +0: its bits are 0 for a hard label, above those of +inf for a
      // negative or NaN one (a target outside [0, 1]), in between for a soft label
      const __m512 spread = _mm512_add_ps(_mm512_fnmadd_ps(g, g, g), zero);
      spread_max = _mm512_max_epu32(spread_max, _mm512_castps_si512(spread));
      if (SAVE) {
        const __m512 d = _mm512_mul_ps(small, inv);  // p (1 - p)
        const __mmask16 hot = _mm512_cmp_ps_mask(g, one, _CMP_EQ_OQ);
        // -d by its sign bit, as the portable loop's -d: a slope of 0 is saved as -0 (0 - d
        // would give +0 and lose the target)
        const __m512 negated = _mm512_mask_xor_ps(d, hot, d, _mm512_set1_ps(-0.0f));
        _mm512_mask_storeu_ps(save + i, lane, negated);
      }
    }
    dI += _mm512_reduce_add_ps(sI);
    dP += _mm512_reduce_add_ps(sP);
    dG += _mm512_reduce_add_ps(sG);
  }
  const uint32_t spread_bits = _mm512_reduce_max_epu32(spread_max);
  const uint32_t x_bits = _mm512_reduce_max_epu32(x_max);
  out[0] = dI; out[1] = dP; out[2] = dG; out[3] = 0; out[4] = 0;
  out[5] = spread_bits > 0x7f800000u ? 1 : 0;  // a target outside [0, 1] or NaN
  out[6] = x_bits > 0x7f7fffffu ? 1 : 0;       // an input that is not finite
  out[7] = spread_bits != 0u ? 1 : 0;          // a target other than 0 and 1
  out[8] = 0;
}
#endif

// The forward pass of one binary chunk: the AVX-512 loop where it applies, else the
// portable one.
template <typename F, typename T, bool LOGITS, bool REGION, int PIXEL>
static void binary_forward(const Args& a, int64_t row, int64_t begin, int64_t end,
                           double* out) {
#if DL_AVX512
  if constexpr (std::is_same_v<F, float> && std::is_same_v<T, float> && LOGITS && REGION &&
                PIXEL == kPixelNone) {
    if (!a.has_ignore && !a.portable_loops) {
      const float* x = static_cast<const float*>(a.x) + row * a.m;
      const float* t = static_cast<const float*>(a.target) + row * a.m;
      if (a.probabilities) {
        binary_region_logits_avx512<true>(x, t, static_cast<float*>(a.probabilities) + row * a.m,
                                          begin, end, out);
      } else {
        binary_region_logits_avx512<false>(x, t, nullptr, begin, end, out);
      }
      return;
    }
  }
#endif
  if constexpr (PIXEL != kPixelNone) {
    if (a.pos_weight) {
      if (a.has_ignore) {
        binary_forward_chunk<F, T, LOGITS, REGION, PIXEL, true, true>(a, row, begin, end, out);
      } else {
        binary_forward_chunk<F, T, LOGITS, REGION, PIXEL, false, true>(a, row, begin, end, out);
      }
      return;
    }
  }
  if (a.has_ignore) {
    binary_forward_chunk<F, T, LOGITS, REGION, PIXEL, true, false>(a, row, begin, end, out);
  } else {
    binary_forward_chunk<F, T, LOGITS, REGION, PIXEL, false, false>(a, row, begin, end, out);
  }
}

// Region term: (gp + gi g) dp/dx, 0 where ignored, from the signed slopes d the forward saved
// (see binary_forward_chunk). HARD: every kept target is 0 or 1, which the sign of d tells
// (ignored elements saved d = 0); else the target is read for g and the kept mask.
template <typename F, typename T, bool REGION, int PIXEL, bool HARD>
static void binary_backward_chunk(const Args& a, int64_t row, int64_t begin, int64_t end) {
  const T* t = static_cast<const T*>(a.target) + row * a.m;
  const F* d = REGION ? static_cast<const F*>(a.probabilities) + row * a.m : nullptr;
  const F* slope = PIXEL != kPixelNone ? static_cast<const F*>(a.slope) + row * a.m : nullptr;
  F* grad = static_cast<F*>(a.grad) + row * a.m;
  const bool has_ignore = a.has_ignore != 0;
  const int64_t ignore = a.ignore_index;
  const int64_t at = a.pooled ? row % a.c : row;
  const F scale = static_cast<F>(a.region_scale);
  const F gi = REGION ? scale * static_cast<const F*>(a.grad_intersection)[at] : F(0);
  const F gp = REGION ? scale * static_cast<const F*>(a.grad_prediction)[at] : F(0);
  const F gs = static_cast<F>(a.grad_pixel);
  const bool prefetch = prefetching(begin, end);
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < end ? b0 + kBlock : end;
    const int64_t ahead = b0 == begin ? 0 : kPrefetch;  // the chunk's start, then ahead
    const int64_t count = b0 == begin ? kPrefetch + kBlock : kBlock;
    if (REGION && prefetch) prefetch_range(d + b0 + ahead, count);
    if (PIXEL != kPixelNone && prefetch) prefetch_range(slope + b0 + ahead, count);
    if (REGION && !HARD && prefetch) prefetch_range(t + b0 + ahead, count);
#pragma omp simd
    for (int64_t i = b0; i < b1; ++i) {
      F total = 0;
      if (REGION) {
        const F dv = d[i];
        const F dpdx = abs_f(dv);
        if (HARD) {
          total = (gp + (sign_bit(dv) ? gi : F(0))) * dpdx;
        } else {
          const T tv = t[i];
          const bool keep = !(has_ignore & is_ignored(tv, ignore));
          const F g = keep ? static_cast<F>(tv) : F(0);
          total = keep ? (gp + gi * g) * dpdx : F(0);
        }
      }
      if (PIXEL != kPixelNone) total += gs * slope[i];
      grad[i] = total;
    }
  }
}

// ------------------------------------------------------------------------------ multiclass
constexpr int kPartClassExtra = 5;  // S count badT badX overflow

// Per-pixel state of one chunk of one sample: class, kept flag, softmax statistics.
template <typename F, typename T, bool LOGITS>
struct ClassChunk {
  int32_t cls[kClassChunk];
  F keep[kClassChunk];
  F mx[kClassChunk];
  F oth[kClassChunk];   // sum_c exp(x_c - max) but for one class at the max (its exact 1):
                            // 1 - p = oth inv at a class at the max
  F inv[kClassChunk];   // 1 / sum_c exp(x_c - max) = 1 / (1 + oth)
  F unique[kClassChunk];  // 1 where one class alone holds the max, else 0
  F lg[kClassChunk];    // log(1 + oth) = logsumexp - max, from log1p: all its digits
  F xt[kClassChunk];    // the input at the target class
  // forward with logits: exp(x_c - max) of every class, written by load() into the output
  // buffer that the forward pass then overwrites (probabilities or slopes), so that the
  // exponentials are not computed twice; null without such a buffer (no gradient wanted)
  F* ecache;
  int64_t len;

  // Fills cls/keep; with `inputs` (forward) also xt and the softmax statistics, which read x
  // (backward reads only the saved buffers: x is not passed then). Returns the number of kept
  // pixels whose class index is out of range (they are dropped).
  // PIXEL_STATS: also xt and lg, which only the pixel losses read (a region loss alone
  // skips the gather and the logarithm).
  template <bool PIXEL_STATS>
  double load(const Args& a, int64_t sample, int64_t begin, int64_t end, bool inputs) {
    len = end - begin;
    const T* t = static_cast<const T*>(a.target) + sample * a.m + begin;
    const bool has_ignore = a.has_ignore != 0;
    const int64_t ignore = a.ignore_index;
    const int64_t classes = a.c;
    float bad = 0;
#pragma omp simd reduction(+ : bad)
    for (int64_t j = 0; j < len; ++j) {
      const T tv = t[j];
      const bool ignored = has_ignore & is_ignored(tv, ignore);
      const int64_t v = static_cast<int64_t>(tv);
      const bool in_range = (v >= 0) & (v < classes);
      bad += (!ignored & !in_range) ? 1.0f : 0.0f;
      cls[j] = (!ignored & in_range) ? static_cast<int32_t>(v) : 0;
      keep[j] = (!ignored & in_range) ? F(1) : F(0);
    }
    ecache = nullptr;
    if (!inputs) return bad;
    const F* x = static_cast<const F*>(a.x) + sample * a.c * a.m + begin;
    if (PIXEL_STATS) {
      for (int64_t j = 0; j < len; ++j) xt[j] = x[cls[j] * a.m + j];
    }
    if (!LOGITS) return bad;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) mx[j] = x[j];
    // the pixel losses: a NaN logit in any class makes the max NaN, and so the pixel's loss
    // (the reference's logsumexp: TopK ranks that loss above all; the region sums need not)
    for (int64_t c = 1; c < classes; ++c) {
      const F* xc = x + c * a.m;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const bool take = PIXEL_STATS ? (xc[j] > mx[j]) | (xc[j] != xc[j]) : xc[j] > mx[j];
        mx[j] = take ? xc[j] : mx[j];
      }
    }
    // The term exp(0) = 1 of one class at the max is left out of the sum and added as the
    // exact 1 of log1p: 1 - p there and logsumexp - x there keep their digits where the
    // softmax saturates (as a float32 sum 1 + oth would lose them). Classes below the max are
    // summed; every further class at the max adds its exact 1 (ties - 1).
    F* ties = lg;  // lg's storage counts them until lg is formed
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      oth[j] = F(0);
      ties[j] = F(-1);
    }
    F* saved = static_cast<F*>(a.probabilities ? a.probabilities : a.slope);
    ecache = saved ? saved + sample * a.c * a.m + begin : nullptr;
    F scratch_e[kClassChunk];
    for (int64_t c = 0; c < classes; ++c) {
      const F* xc = x + c * a.m;
      F* ec = ecache ? ecache + c * a.m : scratch_e;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const F xv = xc[j];
        // x - max <= 0; a region loss alone reads only probabilities, whose values below
        // 2^-126 do not count (flushed to 0, as the binary region pass does); the pixel
        // losses' log(sum exp) and 1 - p keep them
        const F e = PIXEL_STATS ? exp_f(xv - mx[j]) : exp_nonpositive(xv - mx[j]);
        ec[j] = e;
        oth[j] += xv < mx[j] ? e : F(0);
        ties[j] += xv == mx[j] ? F(1) : F(0);
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const F o = oth[j] + ties[j];  // ties is 0 but where logits tie at the max
      unique[j] = ties[j] == F(0) ? F(1) : F(0);
      oth[j] = o;
      inv[j] = F(1) / (F(1) + o);
    }
    if (PIXEL_STATS) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const F o = oth[j];
        // (a NaN o gives some finite value: its NaN input is counted invalid, the loss NaN)
        lg[j] = o <= F(1) ? log1p_f(o) : log_f(F(1) + o);
      }
    }
    return bad;
  }
};

template <typename F, typename T, bool LOGITS, bool REGION, int PIXEL>
static void class_forward_chunk(const Args& a, int64_t sample, int64_t begin, int64_t end,
                                double* out) {
  ClassChunk<F, T, LOGITS> s;
  const double bad = s.template load<PIXEL != kPixelNone>(a, sample, begin, end, true);
  const int64_t offset = sample * a.c * a.m + begin;
  const F* x = static_cast<const F*>(a.x) + offset;
  const int64_t len = s.len;
  const F gamma = static_cast<F>(a.gamma);
  F coef[kClassChunk];  // pixel: alpha_t * d(focal)/db, 0 where not kept
  F sS = 0, sN = 0;
  float over = 0;
  if (PIXEL != kPixelNone) {
    const F* alpha = static_cast<const F*>(a.class_alpha);
    const bool has_alpha = a.has_alpha != 0;
    const bool weighted_count = has_alpha && a.weighted_count != 0;
    F scratch_loss[kClassChunk];
    F* lo = a.loss ? static_cast<F*>(a.loss) + sample * a.m + begin : scratch_loss;
    const F ignored_loss = static_cast<F>(a.ignored_loss);
#pragma omp simd reduction(+ : sS, sN, over)
    for (int64_t j = 0; j < len; ++j) {
      // logsumexp - x_t = (max - x_t) + log(1 + oth): no large max added and taken away
      const F b = LOGITS ? (s.mx[j] - s.xt[j]) + s.lg[j] : -clamped_log(s.xt[j]);
      const F w = has_alpha ? alpha[s.cls[j]] : F(1);
      F factor;
      const F loss = focal_terms<PIXEL>(b, gamma, factor) * w;
      factor *= w;
      // probabilities: -(factor / p_t), +-inf where 1/p_t overflows (counted, see the
      // binary pass)
      if (!LOGITS) factor = -clamped_log_ratio(factor, s.xt[j]);
      const bool kept = s.keep[j] != F(0);
      if (!LOGITS) over += (kept & (abs_f(factor) > kFinite<F>)) ? 1.0f : 0.0f;
      sS += kept ? loss : F(0);
      // (the selects inside kept's: the loop stays vectorised, the sums in their order)
      sN += kept ? (weighted_count ? w : F(1)) : F(0);
      coef[j] = kept ? factor : F(0);
      lo[j] = kept ? loss : ignored_loss;
    }
  }
  float badx = 0;
  F scratch_p[kClassChunk], scratch_slope[kClassChunk];  // when no gradient is wanted
  // CACHED: the exponentials come from load()'s cache (see ClassChunk::ecache)
  auto each_class = [&](auto cached) {
    constexpr bool CACHED = decltype(cached)::value;
    for (int64_t c = 0; c < a.c; ++c) {
      const F* xc = x + c * a.m;
      const F* ec = CACHED ? s.ecache + c * a.m : nullptr;
      F* pc = a.probabilities ? static_cast<F*>(a.probabilities) + offset + c * a.m : scratch_p;
      F* sc = a.slope ? static_cast<F*>(a.slope) + offset + c * a.m : scratch_slope;
      const int32_t cc = static_cast<int32_t>(c);
      F sI = 0, sP = 0, sG = 0;
#pragma omp simd reduction(+ : sI, sP, sG, badx)
      for (int64_t j = 0; j < len; ++j) {
        const F xv = xc[j];
        const bool valid_x = LOGITS ? (abs_f(xv) <= kFinite<F>)
                                    : ((xv >= F(0)) & (xv <= F(1)));
        badx += ((s.keep[j] != F(0)) & !valid_x) ? 1.0f : 0.0f;
        const F e = CACHED ? ec[j] : exp_f(xv - s.mx[j]);
        const F p = LOGITS ? e * s.inv[j] : xv;
        const bool on = s.cls[j] == cc;
        // kept or not is selected, not multiplied in: a NaN in an ignored pixel is ignored
        const bool kept = s.keep[j] != F(0);
        // -(1 - p) = -oth inv, read unconditionally (selected below, not loaded under a mask);
        // probabilities in: no softmax statistics (oth, inv, mx, unique are not filled), and
        // the constant LOGITS keeps them unread
        const F minus_q = LOGITS ? -(s.oth[j] * s.inv[j]) : F(0);
        if (REGION) {
          sP += pick(kept, p, F(0));
          sI += pick(on & kept, p, F(0));
          sG += pick(on, s.keep[j], F(0));
          // saved for backward: p, but p - 1 = -(1 - p) with all its digits (a negative
          // number, or -0) at the class that alone holds the max (see class_backward_chunk)
          const bool top = LOGITS ? (xv == s.mx[j]) & (s.unique[j] != F(0)) : false;
          pc[j] = pick(top, minus_q, p);
        }
        if (PIXEL != kPixelNone) {
          // p - 1 at the target class: -(1 - p) = -oth inv where that class is the most
          // probable (p near 1), else formed as it is (p <= 1/2 there)
          const bool at_max = LOGITS ? s.xt[j] == s.mx[j] : false;
          const F p_minus_on = pick(on & at_max, minus_q, p - pick(on, F(1), F(0)));
          const F pixel_slope = LOGITS ? coef[j] * p_minus_on : pick(on, coef[j], F(0));
          sc[j] = pick(kept, pixel_slope, F(0));
        }
      }
      if (REGION) {
        out[3 * c] = sI; out[3 * c + 1] = sP; out[3 * c + 2] = sG;
      }
    }
  };
  if (LOGITS && s.ecache) each_class(std::true_type{});
  else each_class(std::false_type{});
  double* extra = out + 3 * a.c;
  extra[0] = sS; extra[1] = sN; extra[2] = bad; extra[3] = badx; extra[4] = over;
}

template <typename F, typename T, bool LOGITS, bool REGION, int PIXEL>
static void class_backward_chunk(const Args& a, int64_t sample, int64_t begin, int64_t end) {
  ClassChunk<F, T, LOGITS> s;
  s.template load<false>(a, sample, begin, end, false);
  const int64_t offset = sample * a.c * a.m + begin;
  F* grad = static_cast<F*>(a.grad) + offset;
  const int64_t len = s.len;
  const int64_t classes = a.c;
  const F gs = static_cast<F>(a.grad_pixel);
  const int64_t at = a.pooled ? 0 : sample * classes;
  const F scale = static_cast<F>(a.region_scale);
  const F* gi = REGION ? static_cast<const F*>(a.grad_intersection) + at : nullptr;
  const F* gp = REGION ? static_cast<const F*>(a.grad_prediction) + at : nullptr;
  const F* p = REGION ? static_cast<const F*>(a.probabilities) + offset : nullptr;
  const F* slope = PIXEL != kPixelNone ? static_cast<const F*>(a.slope) + offset : nullptr;
  // logits, region: the softmax backward p_c (u_c - sum_k p_k u_k) of u_c = gp_c + gi_c [c == t].
  // At the class that alone holds the max (p near 1 where the softmax saturates), which the
  // forward pass saved as v = p - 1 (sign bit set), u_c - sum_k p_k u_k is formed as
  // -u v - sum_{k != top} p_k u_k from the other classes' small p_k: as a difference of two
  // nearly equal float32 numbers it lost up to all its digits there.
  F mixed[kClassChunk];   // sum_k p_k u_k
  F below_u[kClassChunk];  // sum_{k != top} p_k u_k
  if (REGION && LOGITS) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      mixed[j] = F(0);
      below_u[j] = F(0);
    }
    for (int64_t c = 0; c < classes; ++c) {
      const F* pc = p + c * a.m;
      const F gpc = gp[c];
      const F gic = gi[c];
      const int32_t cc = static_cast<int32_t>(c);
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const F v = pc[j];
        const bool top = sign_bit(v);
        const F u = gpc + (s.cls[j] == cc ? gic : F(0));
        const F pu = (top ? F(1) + v : v) * u;
        mixed[j] += pu;
        below_u[j] += top ? F(0) : pu;
      }
    }
  }
  for (int64_t c = 0; c < classes; ++c) {
    F* gc = grad + c * a.m;
    const int32_t cc = static_cast<int32_t>(c);
    const F gic = REGION ? gi[c] : F(0);
    const F gpc = REGION ? gp[c] : F(0);
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      F total = 0;
      if (REGION) {
        const F u = gpc + (s.cls[j] == cc ? gic : F(0));
        const F v = p[c * a.m + j];
        const bool top = LOGITS && sign_bit(v);
        const F spread = top ? -(u * v) - below_u[j] : u - mixed[j];
        total = scale * (LOGITS ? (top ? F(1) + v : v) * spread : u);
        total = s.keep[j] != F(0) ? total : F(0);
      }
      if (PIXEL != kPixelNone) total += gs * slope[c * a.m + j];
      gc[j] = total;
    }
  }
}

// ------------------------------------------------------------------------------ drivers
// Cuts `rows` rows of `length` elements into chunks of `chunk` and runs
// body(task, row, begin, end) for each, on a.threads OpenMP threads (static schedule; inputs
// of fewer than kParallelMin `elements` in all stay on the calling thread). Task k is chunk
// k % chunks of row k / chunks, so partial results indexed by k come out in a fixed order.
template <typename Body>
static void for_each_chunk(const Args& a, int64_t rows, int64_t length, int64_t chunk,
                           int64_t elements, const Body& body) {
  const int64_t chunks = (length + chunk - 1) / chunk;
  const int64_t tasks = rows * chunks;
  const bool parallel = tasks > 1 && elements >= kParallelMin;
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(a.threads)) if (parallel)
  for (int64_t k = 0; k < tasks; ++k) {
    const int64_t begin = (k % chunks) * chunk;
    body(k, k / chunks, begin, begin + chunk < length ? begin + chunk : length);
  }
}

// Rows shorter than kChunk: each task takes `group` whole rows (kChunk / m of them), so that a
// task does as much work as a chunk of a long row whatever the shape (one task per row of
// (8e6, 1, 1) cost seconds and 9 doubles of partial sums per row). The rows' region sums go
// straight to a.region; a task's S, count and checks are summed over its rows in order, and
// tasks are added in order: deterministic for any number of threads, like the chunks.
template <typename F, typename T, bool LOGITS, bool REGION, int PIXEL, bool BACKWARD>
static void run_binary_short_rows(const Args& a, int64_t rows) {
  const int64_t group = kChunk / a.m;
  const int64_t tasks = (rows + group - 1) / group;
  std::vector<double> part(BACKWARD ? 0 : tasks * kPartBinary);
  const bool parallel = tasks > 1 && rows * a.m >= kParallelMin;
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(a.threads)) if (parallel)
  for (int64_t k = 0; k < tasks; ++k) {
    const int64_t first = k * group, last = first + group < rows ? first + group : rows;
    if constexpr (BACKWARD) {
      for (int64_t r = first; r < last; ++r) {
        if (a.hard_targets) binary_backward_chunk<F, T, REGION, PIXEL, true>(a, r, 0, a.m);
        else binary_backward_chunk<F, T, REGION, PIXEL, false>(a, r, 0, a.m);
      }
    } else {
      double sum[kPartBinary] = {0};
      for (int64_t r = first; r < last; ++r) {
        double q[kPartBinary];
        binary_forward<F, T, LOGITS, REGION, PIXEL>(a, r, 0, a.m, q);
        if (REGION) { a.region[3 * r] = q[0]; a.region[3 * r + 1] = q[1]; a.region[3 * r + 2] = q[2]; }
        for (int j = 3; j < kPartBinary; ++j) sum[j] += q[j];
      }
      std::memcpy(&part[k * kPartBinary], sum, sizeof sum);
    }
  }
  if constexpr (BACKWARD) return;
  double S = 0, count = 0, bad = 0, badx = 0, soft = 0, over = 0;
  for (int64_t k = 0; k < tasks; ++k) {
    const double* q = &part[k * kPartBinary];
    S += q[3]; count += q[4]; bad += q[5]; badx += q[6]; soft += q[7]; over += q[8];
  }
  if (PIXEL != kPixelNone) {
    a.pixel_out[0] = S; a.pixel_out[1] = count > 0 ? count : 1; a.pixel_out[2] = count;
  }
  a.check[0] = bad; a.check[1] = badx; a.check[2] = soft; a.check[3] = over;
}

template <typename F, typename T, bool LOGITS, bool REGION, int PIXEL, bool BACKWARD>
static void run_binary(const Args& a) {
  const int64_t rows = a.n * a.c;
  if (a.m > 0 && a.m <= kChunk / 2 && rows > 1) {
    run_binary_short_rows<F, T, LOGITS, REGION, PIXEL, BACKWARD>(a, rows);
    return;
  }
  const int64_t chunks = (a.m + kChunk - 1) / kChunk;
  const int64_t tasks = rows * chunks;
  std::vector<double> part(BACKWARD ? 0 : tasks * kPartBinary);
  for_each_chunk(a, rows, a.m, kChunk, rows * a.m,
                 [&](int64_t k, int64_t row, int64_t begin, int64_t end) {
    if constexpr (BACKWARD) {
      if (a.hard_targets) binary_backward_chunk<F, T, REGION, PIXEL, true>(a, row, begin, end);
      else binary_backward_chunk<F, T, REGION, PIXEL, false>(a, row, begin, end);
    } else {
      binary_forward<F, T, LOGITS, REGION, PIXEL>(a, row, begin, end, &part[k * kPartBinary]);
    }
  });
  if constexpr (BACKWARD) return;
  double S = 0, count = 0, bad = 0, badx = 0, soft = 0, over = 0;
  for (int64_t r = 0; r < rows; ++r) {
    double I = 0, P = 0, G = 0;
    for (int64_t j = 0; j < chunks; ++j) {
      const double* q = &part[(r * chunks + j) * kPartBinary];
      I += q[0]; P += q[1]; G += q[2]; S += q[3]; count += q[4]; bad += q[5]; badx += q[6];
      soft += q[7]; over += q[8];
    }
    if (REGION) { a.region[3 * r] = I; a.region[3 * r + 1] = P; a.region[3 * r + 2] = G; }
  }
  if (PIXEL != kPixelNone) {
    a.pixel_out[0] = S; a.pixel_out[1] = count > 0 ? count : 1; a.pixel_out[2] = count;
  }
  a.check[0] = bad; a.check[1] = badx; a.check[2] = soft; a.check[3] = over;
}

template <typename F, typename T, bool LOGITS, bool REGION, int PIXEL, bool BACKWARD>
static void run_multiclass(const Args& a) {
  const int64_t chunks = (a.m + kClassChunk - 1) / kClassChunk;
  const int64_t tasks = a.n * chunks;
  const int64_t width = 3 * a.c + kPartClassExtra;
  std::vector<double> part(BACKWARD ? 0 : tasks * width);
  for_each_chunk(a, a.n, a.m, kClassChunk, a.n * a.c * a.m,
                 [&](int64_t k, int64_t sample, int64_t begin, int64_t end) {
    if constexpr (BACKWARD) {
      class_backward_chunk<F, T, LOGITS, REGION, PIXEL>(a, sample, begin, end);
    } else {
      class_forward_chunk<F, T, LOGITS, REGION, PIXEL>(a, sample, begin, end, &part[k * width]);
    }
  });
  if constexpr (BACKWARD) return;
  double S = 0, count = 0, bad = 0, badx = 0, over = 0;
  for (int64_t n = 0; n < a.n; ++n) {
    for (int64_t c = 0; c < a.c && REGION; ++c) {
      double I = 0, P = 0, G = 0;
      for (int64_t j = 0; j < chunks; ++j) {
        const double* q = &part[(n * chunks + j) * width + 3 * c];
        I += q[0]; P += q[1]; G += q[2];
      }
      double* r = a.region + 3 * (n * a.c + c);
      r[0] = I; r[1] = P; r[2] = G;
    }
    for (int64_t j = 0; j < chunks; ++j) {
      const double* q = &part[(n * chunks + j) * width + 3 * a.c];
      S += q[0]; count += q[1]; bad += q[2]; badx += q[3]; over += q[4];
    }
  }
  if (PIXEL != kPixelNone) {
    a.pixel_out[0] = S; a.pixel_out[1] = count > 0 ? count : 1; a.pixel_out[2] = count;
  }
  a.check[0] = bad; a.check[1] = badx; a.check[2] = 0; a.check[3] = over;
}

template <typename F, typename T, bool LOGITS, bool REGION, int PIXEL, bool BACKWARD>
static int run(const Args& a, bool multiclass) {
  if (multiclass) {
    if constexpr (std::is_floating_point_v<T>) return 2;  // class indices are never float
    else run_multiclass<F, T, LOGITS, REGION, PIXEL, BACKWARD>(a);
  } else {  // binary backward reads only saved slopes: one instantiation for logits or not
    // (double: float64 targets only, see pick_target)
    if constexpr (std::is_same_v<F, double> && !std::is_floating_point_v<T>) return 2;
    else run_binary<F, T, BACKWARD || LOGITS, REGION, PIXEL, BACKWARD>(a);
  }
  return 0;
}

template <typename F, typename T, bool LOGITS, bool REGION, bool BACKWARD>
static int pick_pixel(const Args& a, bool multiclass) {
  if constexpr (BACKWARD) {  // backward reads the saved slope: the focal variant does not matter
    if (a.pixel != kPixelNone) return run<F, T, LOGITS, REGION, kPixelBce, true>(a, multiclass);
    if constexpr (REGION) return run<F, T, LOGITS, true, kPixelNone, true>(a, multiclass);
    return 2;
  } else {
    switch (a.pixel) {
      case kPixelBce: return run<F, T, LOGITS, REGION, kPixelBce, false>(a, multiclass);
      case kPixelFocal2: return run<F, T, LOGITS, REGION, kPixelFocal2, false>(a, multiclass);
      case kPixelFocal: return run<F, T, LOGITS, REGION, kPixelFocal, false>(a, multiclass);
      case kPixelNone:
        if constexpr (REGION) return run<F, T, LOGITS, true, kPixelNone, false>(a, multiclass);
        return 2;
      default:
        return 2;
    }
  }
}

template <typename F, typename T, bool BACKWARD>
static int pick_flags(const Args& a, bool multiclass) {
  if (a.logits) {
    return a.want_region ? pick_pixel<F, T, true, true, BACKWARD>(a, multiclass)
                         : pick_pixel<F, T, true, false, BACKWARD>(a, multiclass);
  }
  return a.want_region ? pick_pixel<F, T, false, true, BACKWARD>(a, multiclass)
                       : pick_pixel<F, T, false, false, BACKWARD>(a, multiclass);
}

// float inputs read float32, uint8 and int64 targets; double ones (rarer: fewer
// instantiations, a shorter build) read float64 targets in binary/multilabel mode and int64
// class indices in multiclass mode (the caller converts the others)
template <typename F, bool BACKWARD>
static int pick_target(const Args& a, bool multiclass) {
  if constexpr (std::is_same_v<F, double>) {
    if (multiclass) return a.target_type == kInt64 ? pick_flags<F, int64_t, BACKWARD>(a, true) : 2;
    return a.target_type == kFloat64 ? pick_flags<F, double, BACKWARD>(a, false) : 2;
  } else {
    switch (a.target_type) {
      case kFloat32: return multiclass ? 2 : pick_flags<F, float, BACKWARD>(a, false);
      case kUInt8: return pick_flags<F, uint8_t, BACKWARD>(a, multiclass);
      case kInt64: return pick_flags<F, int64_t, BACKWARD>(a, multiclass);
      default: return 2;
    }
  }
}

template <bool BACKWARD>
static int dispatch(const Args* a, bool multiclass) {
  if (a == nullptr || a->n < 0 || a->c < 1 || a->m < 0 || a->threads < 1) return 2;
  try {
    switch (a->real) {
      case kReal32: return pick_target<float, BACKWARD>(*a, multiclass);
      case kReal64: return pick_target<double, BACKWARD>(*a, multiclass);
      default: return 2;
    }
  } catch (const std::bad_alloc&) {
    return 1;
  }
}

// ------------------------------------------------------------------------------ TopK
// The n largest of the losses the forward pass saved, as dynloss._math.topk_mask selects
// them: ties at the threshold taken by lowest flat index, NaN ranked above +inf, +inf above
// every finite loss. Each loss maps to an unsigned rank key that orders as the losses do:
//     key(v) = bits(v) + 1 for v >= 0 (-0 read as +0), key(NaN) = key(+inf) + 1,
//     key(v < 0) = 0.
// Kept losses are >= 0 for valid inputs (an invalid target may make one negative; the loss
// is NaN then anyway), ignored ones were saved as -inf: key 0 ranks them below every kept
// loss, and n never exceeds the kept count, so they are never selected.
// Selection (no sort): a histogram of the keys' high 16 bits finds the bin holding the n-th
// largest key (a bin spans 1/128 of an octave, so on ordinary data it holds few keys), one of
// the next 8 bits of the keys in that bin narrows it, and one of the last 8 bits finds the
// key T itself. Every key above T is selected, and of the keys equal to T the `need` of lowest
// flat index: when not all are needed, a pass counts them per chunk, and the chunks take
// them in flat order (at most one chunk takes only some, in order within it).
// Histograms count exactly (integers), and the sum of the selected losses is formed per
// chunk (float blocks of at most kBlock, a double per chunk, chunks added in order), so the
// result is bitwise the same for any number of threads.

constexpr int64_t kCopies = 4;  // interleaved histograms per group
constexpr int64_t kSmallTopK = int64_t{1} << 16;  // TopK's digits: see topk_select
constexpr uint32_t kNanKey = 0x7f800002u;  // key(+inf) + 1: NaN ranks above +inf
constexpr uint64_t kNanKey64 = 0x7ff0000000000002u;  // the same for double

DL_INLINE uint32_t rank_key(float v) {
  const uint32_t bits = as_bits(v + 0.0f);  // -0 + 0 = +0
  return v >= 0.0f ? bits + 1u : (v == v ? 0u : kNanKey);
}
// double losses: 64-bit keys (bit 63 is 0 in every key, as bit 31 of the float ones)
DL_INLINE uint64_t rank_key(double v) {
  const uint64_t bits = as_bits(v + 0.0);
  return v >= 0.0 ? bits + 1u : (v == v ? 0u : kNanKey64);
}

// The losses as rows x length (flat order), each with `classes` slopes at stride `length`
// in the saved slope buffer: binary/multilabel one row of N*C*M, one slope each;
// multiclass N rows of M pixels, C slopes each.
struct TopKLayout {
  int64_t rows, length, classes, chunks, tasks;
  TopKLayout(int64_t r, int64_t len, int64_t c)
      : rows(r), length(len), classes(c), chunks((len + kChunk - 1) / kChunk),
        tasks(r * ((len + kChunk - 1) / kChunk)) {}
  int64_t begin(int64_t k) const { return (k % chunks) * kChunk; }
  int64_t end(int64_t k) const {
    const int64_t b = begin(k) + kChunk;
    return b < length ? b : length;
  }
  int64_t row(int64_t k) const { return k / chunks; }
};

// body(group, first, last) for the tasks [first, last) of each group: the tasks cut into
// `groups` contiguous runs, each on its own thread (a group's histogram needs no atomics, and
// the groups' integer counts add up exactly whatever the split).
template <typename Body>
static void for_each_group(const TopKLayout& s, int64_t groups, const Body& body) {
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(groups)) if (groups > 1)
  for (int64_t g = 0; g < groups; ++g) body(g, s.tasks * g / groups, s.tasks * (g + 1) / groups);
}

// Counts of the digits (key >> shift) & (2^width - 1) of the keys whose bits above the digit
// equal `prefix` (every key when prefix < 0), into hist[0..2^width). Each group counts in
// kCopies interleaved uint32 histograms, so that a run of equal keys (a constant region, a
// network at initialisation) is not one chain of increments of the same counter, and adds
// them into its int64 totals before a count could overflow.
template <typename F>
static void digit_histogram(const Args& a, const TopKLayout& s, int64_t groups, int shift,
                            int width, int64_t prefix, std::vector<int64_t>& hist) {
  using Key = decltype(rank_key(F(0)));
  const int64_t bins = int64_t{1} << width;
  const Key mask = static_cast<Key>(bins - 1);
  const int top = shift + width;  // < the key's bits whenever a prefix is given
  const Key want = static_cast<Key>(prefix);
  // uninitialised: each group zeroes its own part, in parallel
  std::unique_ptr<uint32_t[]> copies(new uint32_t[static_cast<size_t>(groups * kCopies * bins)]);
  std::unique_ptr<int64_t[]> totals(new int64_t[static_cast<size_t>(groups * bins)]);
  for_each_group(s, groups, [&](int64_t g, int64_t first, int64_t last) {
    uint32_t* c = &copies[static_cast<size_t>(g * kCopies * bins)];
    int64_t* total = &totals[static_cast<size_t>(g * bins)];
    std::memset(c, 0, static_cast<size_t>(kCopies * bins) * sizeof(uint32_t));
    std::memset(total, 0, static_cast<size_t>(bins) * sizeof(int64_t));
    int64_t pending = 0;  // counted since the last flush into the totals
    auto flush = [&]() {
      for (int64_t j = 0; j < kCopies; ++j) {
        for (int64_t b = 0; b < bins; ++b) { total[b] += c[j * bins + b]; c[j * bins + b] = 0; }
      }
      pending = 0;
    };
    Key keys[kBlock];
    uint32_t digits[kBlock];
    for (int64_t k = first; k < last; ++k) {
      const F* loss = static_cast<const F*>(a.loss) + s.row(k) * s.length;
      for (int64_t b0 = s.begin(k); b0 < s.end(k); b0 += kBlock) {
        const int64_t b1 = b0 + kBlock < s.end(k) ? b0 + kBlock : s.end(k);
        int64_t len = b1 - b0;
        if (prefix < 0) {
#pragma omp simd
          for (int64_t i = b0; i < b1; ++i) {
            digits[i - b0] = static_cast<uint32_t>((rank_key(loss[i]) >> shift) & mask);
          }
        } else {  // the keys in the threshold's bin, usually few: skip blocks without one
          float hits = 0;
#pragma omp simd reduction(+ : hits)
          for (int64_t i = b0; i < b1; ++i) {
            keys[i - b0] = rank_key(loss[i]);
            hits += (keys[i - b0] >> top) == want ? 1.0f : 0.0f;
          }
          if (hits == 0.0f) continue;
          len = 0;
          for (int64_t i = 0; i < b1 - b0; ++i) {  // compress them (branch-free)
            digits[len] = static_cast<uint32_t>((keys[i] >> shift) & mask);
            len += (keys[i] >> top) == want ? 1 : 0;
          }
        }
        if (pending > int64_t{0xffffffff} - kBlock) flush();
        pending += len;
        int64_t i = 0;
        for (; i + kCopies <= len; i += kCopies) {
          ++c[digits[i]];
          ++c[bins + digits[i + 1]];
          ++c[2 * bins + digits[i + 2]];
          ++c[3 * bins + digits[i + 3]];
        }
        for (; i < len; ++i) ++c[digits[i]];
      }
    }
    flush();
  });
  hist.assign(static_cast<size_t>(bins), 0);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t b = 0; b < bins; ++b) hist[b] += totals[static_cast<size_t>(g * bins + b)];
  }
}

// The highest bin b at which `above` plus the counts of bins >= b reach n (n > above);
// `above` becomes the count of the bins above b.
static int64_t bin_of_nth(const std::vector<int64_t>& hist, int64_t n, int64_t& above) {
  for (int64_t b = static_cast<int64_t>(hist.size()) - 1; b > 0; --b) {
    if (above + hist[b] >= n) return b;
    above += hist[b];
  }
  return 0;
}

// One chunk of the final pass: selects key > T, and key == T for the first `take` such
// keys in flat order (take < 0: all of them); returns the sum of the selected losses and
// zeroes the slopes of the others (and their losses, with a.zero_unselected).
template <typename F, typename Key>
static double select_chunk(const Args& a, const TopKLayout& s, int64_t k, Key threshold,
                           int64_t take) {
  const int64_t row = s.row(k);
  const F* loss = static_cast<const F*>(a.loss) + row * s.length;
  F* slope = a.slope ? static_cast<F*>(a.slope) + row * s.classes * s.length : nullptr;
  float chosen[kBlock];  // 1 selected, 0 not
  double total = 0;
  int64_t taken = 0;
  const bool all_ties = take < 0;
  for (int64_t b0 = s.begin(k); b0 < s.end(k); b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < s.end(k) ? b0 + kBlock : s.end(k);
    if (all_ties || take == 0) {
#pragma omp simd
      for (int64_t i = b0; i < b1; ++i) {
        const Key key = rank_key(loss[i]);
        const bool on = all_ties ? key >= threshold : key > threshold;
        chosen[i - b0] = on ? 1.0f : 0.0f;
      }
    } else {  // the one chunk whose ties are taken in part: in flat order
      for (int64_t i = b0; i < b1; ++i) {
        const Key key = rank_key(loss[i]);
        bool on = key > threshold;
        if (key == threshold && taken < take) { on = true; ++taken; }
        chosen[i - b0] = on ? 1.0f : 0.0f;
      }
    }
    F sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = b0; i < b1; ++i) sum += chosen[i - b0] != 0.0f ? loss[i] : F(0);
    total += sum;
    if (a.zero_unselected) {
      F* kept_loss = static_cast<F*>(a.loss) + row * s.length;
#pragma omp simd
      for (int64_t i = b0; i < b1; ++i) {
        kept_loss[i] = chosen[i - b0] != 0.0f ? kept_loss[i] : F(0);
      }
    }
    for (int64_t c = 0; slope && c < s.classes; ++c) {
      F* sc = slope + c * s.length;
#pragma omp simd
      for (int64_t i = b0; i < b1; ++i) sc[i] = chosen[i - b0] != 0.0f ? sc[i] : F(0);
    }
  }
  return total;
}

// Float keys take 3 passes (digits of 15, 8 and 8 bits; 4 of 7 and 8 below kSmallTopK
// elements), double keys 4 (15 and three of 16 bits; 8 of 7 and 8 bits below kSmallTopK).
template <typename F>
struct TopKDigits;
template <>
struct TopKDigits<float> {
  static constexpr int kPasses = 3, kSmallPasses = 4;
  static constexpr int kShifts[3] = {16, 8, 0}, kWidths[3] = {15, 8, 8};
  static constexpr int kSmallShifts[4] = {24, 16, 8, 0}, kSmallWidths[4] = {7, 8, 8, 8};
};
template <>
struct TopKDigits<double> {
  static constexpr int kPasses = 4, kSmallPasses = 8;
  static constexpr int kShifts[4] = {48, 32, 16, 0}, kWidths[4] = {15, 16, 16, 16};
  static constexpr int kSmallShifts[8] = {56, 48, 40, 32, 24, 16, 8, 0};
  static constexpr int kSmallWidths[8] = {7, 8, 8, 8, 8, 8, 8, 8};
};

template <typename F>
static void topk_select(const Args& a, const TopKLayout& s) {
  using Key = decltype(rank_key(F(0)));
  using Digits = TopKDigits<F>;
  const int64_t elements = s.rows * s.length;
  const int64_t n = a.topk;
  const bool parallel = s.tasks > 1 && elements >= kParallelMin;
  const int64_t groups = parallel ? (a.threads < s.tasks ? a.threads : s.tasks) : 1;
  // the threshold key T, and per chunk how many of its keys equal to T are selected (-1: all)
  Key threshold = 0;
  std::vector<int64_t> take(static_cast<size_t>(s.tasks), -1);
  if (n <= 0) {  // nothing selected: no key is above this one, and no tie is taken
    threshold = ~Key{0};
    take.assign(static_cast<size_t>(s.tasks), 0);
  } else if (n < elements) {
    std::vector<int64_t> hist;
    int64_t above = 0, prefix = -1;
    // float digits: key bits 30..16 (bit 31 is 0 in every key), 15..8, 7..0; below
    // kSmallTopK elements (which stay in the cache between passes) 30..24, 23..16, 15..8,
    // 7..0, whose histograms are 128 times smaller: clearing and scanning 2^15 bins cost more
    // than the count itself there. Either way the threshold key is the same, and so the
    // selection. Double keys alike over bits 62..0 (TopKDigits).
    const bool small = elements < kSmallTopK;
    const int passes = small ? Digits::kSmallPasses : Digits::kPasses;
    int width = 0;
    for (int pass = 0; pass < passes; ++pass) {
      width = small ? Digits::kSmallWidths[pass] : Digits::kWidths[pass];
      digit_histogram<F>(a, s, groups, small ? Digits::kSmallShifts[pass]
                                             : Digits::kShifts[pass], width, prefix, hist);
      const int64_t digit = bin_of_nth(hist, n, above);
      prefix = (prefix < 0 ? 0 : prefix << width) | digit;
    }
    threshold = static_cast<Key>(prefix);
    const int64_t need = n - above;  // 1 <= need <= hist[T's last digit]: keys equal to T
    const Key last_digit = threshold & static_cast<Key>((int64_t{1} << width) - 1);
    if (need < hist[static_cast<size_t>(last_digit)]) {  // ties taken in part: per chunk
      std::vector<int64_t> ties(static_cast<size_t>(s.tasks), 0);
      for_each_chunk(a, s.rows, s.length, kChunk, elements,
                     [&](int64_t k, int64_t, int64_t, int64_t) {
        const F* loss = static_cast<const F*>(a.loss) + s.row(k) * s.length;
        int64_t count = 0;
        for (int64_t b0 = s.begin(k); b0 < s.end(k); b0 += kBlock) {
          const int64_t b1 = b0 + kBlock < s.end(k) ? b0 + kBlock : s.end(k);
          float equal = 0;  // exact: a block holds at most kBlock < 2^24 elements
#pragma omp simd reduction(+ : equal)
          for (int64_t i = b0; i < b1; ++i) equal += rank_key(loss[i]) == threshold ? 1.0f : 0.0f;
          count += static_cast<int64_t>(equal);
        }
        ties[static_cast<size_t>(k)] = count;
      });
      int64_t left = need;
      for (int64_t k = 0; k < s.tasks; ++k) {
        const int64_t t = ties[static_cast<size_t>(k)];
        take[static_cast<size_t>(k)] = left >= t ? -1 : left;
        left = left >= t ? left - t : 0;
      }
    }
  }  // else every element is selected: threshold 0, all ties
  std::vector<double> part(static_cast<size_t>(s.tasks), 0.0);
  for_each_chunk(a, s.rows, s.length, kChunk, elements,
                 [&](int64_t k, int64_t, int64_t, int64_t) {
    part[static_cast<size_t>(k)] = select_chunk<F, Key>(a, s, k, threshold,
                                                        take[static_cast<size_t>(k)]);
  });
  double total = 0;
  for (int64_t k = 0; k < s.tasks; ++k) total += part[static_cast<size_t>(k)];
  a.pixel_out[0] = total;
}

static int topk_entry(const Args* a, bool multiclass) {
  if (a == nullptr || a->n < 0 || a->c < 1 || a->m < 0 || a->threads < 1 || a->topk < 0 ||
      a->pixel_out == nullptr || (a->real != kReal32 && a->real != kReal64)) {
    return 2;
  }
  const TopKLayout s = multiclass ? TopKLayout(a->n, a->m, a->c)
                                  : TopKLayout(1, a->n * a->c * a->m, 1);
  const int64_t elements = s.rows * s.length;
  if (a->topk > elements || (a->loss == nullptr && elements > 0)) return 2;
  try {
    if (a->real == kReal64) topk_select<double>(*a, s);
    else topk_select<float>(*a, s);
  } catch (const std::bad_alloc&) {
    return 1;
  }
  return 0;
}

}  // namespace

extern "C" {
// Return codes: 0 ok, 1 out of memory, 2 invalid arguments.
int dynloss_abi_version() { return 13; }  // bump with struct Args
int dynloss_avx512_loops() { return DL_AVX512; }  // 1: binary_region_logits_avx512 built
int dynloss_binary_forward(const Args* a) { return dispatch<false>(a, false); }
int dynloss_binary_backward(const Args* a) { return dispatch<true>(a, false); }
int dynloss_multiclass_forward(const Args* a) { return dispatch<false>(a, true); }
int dynloss_multiclass_backward(const Args* a) { return dispatch<true>(a, true); }
// TopK: select a.topk of the losses a forward pass saved in a.loss (see topk_select)
int dynloss_binary_topk(const Args* a) { return topk_entry(a, false); }
int dynloss_multiclass_topk(const Args* a) { return topk_entry(a, true); }
}
