/* GPT-2 forward and backward pass for training on the CPU, in one call.
 *
 * Why it exists: on MLX's CPU backend a small GPT's training step is dominated by per-operation
 * costs (graph building, dispatch, allocation, strided copies, scalar reductions), not by its
 * matrix products. Here the whole forward + backward of a batch is one C call: every product
 * goes to the BLAS MLX uses (cblas_sgemm, handed in as a pointer), everything else is a
 * contiguous loop the compiler vectorises. The optimizer update stays in MLX.
 *
 * Model (Hugging Face GPT-2; MLX layouts): Linear weights (out, in) row-major, biases (out);
 * pre-LayerNorm blocks; causal attention scaled by 1/sqrt(D); tanh or erf GELU; head tied to wte
 * or its own (V, C) matrix. Loss: the sum over positions of weight * cross-entropy.
 * Shapes: B rows, T positions, N = B * T tokens, C width, H heads, D = C / H, F MLP width,
 * V vocabulary, L layers.
 *
 * Parameters (and gradients) come as an array of pointers in this order: wte (V, C),
 * wpe (P, C), then per layer ln_1.w, ln_1.b, c_attn.w (3C, C), c_attn.b, attn c_proj.w (C, C),
 * c_proj.b, ln_2.w, ln_2.b, c_fc.w (F, C), c_fc.b, mlp c_proj.w (C, F), c_proj.b, then ln_f.w,
 * ln_f.b and lm_head.w (V, C) when the head is not tied. Gradients are ADDED to (a caller
 * accumulates micro-batches by not zeroing them).
 *
 * Built by mlxgpt/cpu/native.py with the system C compiler, once per machine.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
typedef void (*sgemm_fn)(int order, int ta, int tb, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta,
                         float *c, int ldc);

typedef struct {
    int V, P, C, L, H, F;
    int tied;       /* head is wte */
    int gelu_tanh;  /* 1: tanh approximation (gelu_new), 0: erf */
    float eps;
    float dropout;  /* residual and embedding dropout rate (0: none) */
} gpt_dims;

/* Where a batch piece sits, for dropout masks that do not depend on how rows are split:
 * element e of token (row, pos) at site s (0: embeddings, 1 + 2l: layer l's attention output,
 * 2 + 2l: its MLP output) is kept when hash(seed, s, (row * T + pos) * C + e) >= rate * 2^32. */
typedef struct {
    uint32_t seed;
    int64_t row0;   /* the piece's first row in the whole batch */
} gpt_piece;

#define PARAMS_PER_LAYER 12
enum { LN1_W, LN1_B, ATTN_W, ATTN_B, APROJ_W, APROJ_B, LN2_W, LN2_B, FC_W, FC_B, MPROJ_W,
       MPROJ_B };

static sgemm_fn gemm;

/* C (m, n) = alpha * op(A) op(B) + beta * C, row-major, with leading dimensions. */
static void mm(int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
               const float *b, int ldb, float beta, float *c, int ldc) {
    gemm(ROW_MAJOR, ta ? TRANS : NO_TRANS, tb ? TRANS : NO_TRANS, m, n, k, alpha, a, lda, b,
         ldb, beta, c, ldc);
}

/* exp(x) for float32, vectorisable: 2^k * p(r), r = x - k ln2, Taylor degree 7 (relative error
 * ~1e-7); 0 for x < -87 (never a subnormal: x86 computes with those many times slower). */
static inline float fast_exp(float x) {
    float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = (xc - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } two_k;
    two_k.i = ((int32_t)k + 127) << 23;
    return x < -87.0f ? 0.0f : p * two_k.f;
}

/* tanh(u) = 1 - 2 / (exp(2u) + 1): absolute error ~1e-7, which is what GELU needs. */
static inline float fast_tanh(float u) {
    float e = fast_exp(2.0f * (u > 20.0f ? 20.0f : u));
    return 1.0f - 2.0f / (e + 1.0f);
}

/* ------------------------------------------------------------------ pointwise pieces */

/* A 32-bit integer hash with good avalanche (Chris Wellons' lowbias32), vectorisable. */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/* y = x * keep / (1 - rate) for n elements starting at global element `first` of `site`. */
static void dropout(float *y, const float *x, size_t n, const gpt_piece *pc,
                    uint32_t site, uint64_t first, float rate) {
    const uint32_t base = mix32(pc->seed ^ mix32(site * 0x9e3779b9U + 0x632be5abU));
    const uint32_t threshold = (uint32_t)((double)rate * 4294967296.0);
    const float scale = 1.0f / (1.0f - rate);
    const uint32_t start = (uint32_t)first;  /* wraps only past 4G elements per site */
    for (size_t i = 0; i < n; i++)
        y[i] = mix32(base + start + (uint32_t)i) >= threshold ? x[i] * scale : 0.0f;
}

/* y (n, out) = bias in every row, ready for a product to add onto (beta = 1). */
static void fill_rows(float *y, const float *bias, size_t n, int out) {
    for (size_t i = 0; i < n; i++) memcpy(y + i * out, bias, sizeof(float) * out);
}

/* y = a + b, n elements. */
static void add_arrays(float *restrict y, const float *restrict a, const float *restrict b,
                       size_t n) {
    for (size_t i = 0; i < n; i++) y[i] = a[i] + b[i];
}

static void add_rows(float *y, const float *bias, size_t n, int out) {
    for (size_t i = 0; i < n; i++) {
        float *r = y + i * out;
        for (int j = 0; j < out; j++) r[j] += bias[j];
    }
}

/* db (out) += column sums of dy (n, out). */
static void col_sums(float *db, const float *dy, size_t n, int out) {
    for (size_t i = 0; i < n; i++) {
        const float *r = dy + i * out;
        for (int j = 0; j < out; j++) db[j] += r[j];
    }
}

static void layernorm(float *y, float *mean, float *rstd, const float *x, const float *w,
                      const float *b, size_t n, int c, float eps) {
    for (size_t i = 0; i < n; i++) {
        const float *xi = x + i * c;
        float m = 0.0f, v = 0.0f;
        for (int j = 0; j < c; j++) m += xi[j];
        m /= c;
        for (int j = 0; j < c; j++) v += (xi[j] - m) * (xi[j] - m);
        float s = 1.0f / sqrtf(v / c + eps);
        float *yi = y + i * c;
        for (int j = 0; j < c; j++) yi[j] = (xi[j] - m) * s * w[j] + b[j];
        mean[i] = m;
        rstd[i] = s;
    }
}

/* dx += d LayerNorm / dx . dy; dw, db += their gradients. */
static void layernorm_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                               const float *mean, const float *rstd, const float *w, size_t n,
                               int c) {
    for (size_t i = 0; i < n; i++) {
        const float *xi = x + i * c, *gi = dy + i * c;
        float m = mean[i], s = rstd[i], sum_g = 0.0f, sum_gx = 0.0f;
        for (int j = 0; j < c; j++) {
            float xhat = (xi[j] - m) * s, g = gi[j] * w[j];
            sum_g += g;
            sum_gx += g * xhat;
            dw[j] += gi[j] * xhat;
            db[j] += gi[j];
        }
        sum_g /= c;
        sum_gx /= c;
        float *dxi = dx + i * c;
        for (int j = 0; j < c; j++) {
            float xhat = (xi[j] - m) * s;
            dxi[j] += (gi[j] * w[j] - sum_g - xhat * sum_gx) * s;
        }
    }
}

/* y (n, out) = x (n, in) @ W^T + b, W (out, in). */
static void linear(float *y, const float *x, const float *w, const float *b, size_t n, int in,
                   int out) {
    fill_rows(y, b, n, out);
    mm(0, 1, n, out, in, 1.0f, x, in, w, in, 1.0f, y, out);
}

/* The gradients of y = x @ W^T + b: db += column sums of dy, dW += dy^T x, dx = dy W. */
static void linear_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                            const float *w, size_t n, int in, int out) {
    col_sums(db, dy, n, out);
    mm(1, 0, out, in, n, 1.0f, dy, out, x, in, 1.0f, dw, in);
    mm(0, 0, n, in, out, 1.0f, dy, out, w, in, 0.0f, dx, in);
}

#define SQRT_2_OVER_PI 0.7978845608028654f

static void gelu(float *y, const float *x, size_t n, int tanh_form) {
    if (tanh_form) {
        for (size_t i = 0; i < n; i++) {
            float v = x[i];
            y[i] = 0.5f * v * (1.0f + fast_tanh(SQRT_2_OVER_PI * (v + 0.044715f * v * v * v)));
        }
    } else {
        for (size_t i = 0; i < n; i++) y[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678f));
    }
}

/* g *= GELU'(x), in place. */
static void gelu_backward(float *g, const float *x, size_t n, int tanh_form) {
    if (tanh_form) {
        for (size_t i = 0; i < n; i++) {
            float v = x[i], v2 = v * v;
            float t = fast_tanh(SQRT_2_OVER_PI * (v + 0.044715f * v2 * v));
            g[i] *= 0.5f * (1.0f + t) +
                    0.5f * v * (1.0f - t * t) * SQRT_2_OVER_PI * (1.0f + 0.134145f * v2);
        }
    } else {
        for (size_t i = 0; i < n; i++) {
            float v = x[i];
            g[i] *= 0.5f * (1.0f + erff(v * 0.70710678f)) +
                    v * expf(-0.5f * v * v) * 0.3989422804014327f;
        }
    }
}

/* ------------------------------------------------------------------ attention */

/* Causal softmax of each row of s (T, T) in place, scores already scaled; lse (T) keeps each
 * row's log-sum-exp for the backward pass. */
static void causal_softmax(float *s, float *lse, int t) {
    for (int i = 0; i < t; i++) {
        float *r = s + (size_t)i * t, m = r[0], sum = 0.0f;
        for (int j = 1; j <= i; j++) m = r[j] > m ? r[j] : m;
        for (int j = 0; j <= i; j++) {
            r[j] = fast_exp(r[j] - m);
            sum += r[j];
        }
        float inv = 1.0f / sum;
        for (int j = 0; j <= i; j++) r[j] *= inv;
        for (int j = i + 1; j < t; j++) r[j] = 0.0f;
        lse[i] = m + logf(sum);
    }
}

/* y (N, C) from qkv (N, 3C), head by head; p is (T, T) scratch; lse (B, H, T). */
static void attention(float *y, float *lse, const float *qkv, float *p, int b_rows, int t,
                      int c, int h) {
    int d = c / h;
    float scale = 1.0f / sqrtf((float)d);
    for (int b = 0; b < b_rows; b++) {
        for (int hd = 0; hd < h; hd++) {
            const float *q = qkv + (size_t)b * t * 3 * c + hd * d, *k = q + c, *v = q + 2 * c;
            mm(0, 1, t, t, d, scale, q, 3 * c, k, 3 * c, 0.0f, p, t);
            causal_softmax(p, lse + ((size_t)b * h + hd) * t, t);
            mm(0, 0, t, d, t, 1.0f, p, t, v, 3 * c, 0.0f, y + (size_t)b * t * c + hd * d, c);
        }
    }
}

/* dqkv (N, 3C) = gradient of qkv given dy (N, C); p, dp (T, T) scratch. The probabilities are
 * recomputed from q, k and the saved log-sum-exp (T x T per head is not kept). */
static void attention_backward(float *dqkv, const float *dy, const float *qkv, const float *lse,
                               float *p, float *dp, int b_rows, int t, int c, int h) {
    int d = c / h;
    float scale = 1.0f / sqrtf((float)d);
    for (int b = 0; b < b_rows; b++) {
        for (int hd = 0; hd < h; hd++) {
            size_t row0 = (size_t)b * t;
            const float *q = qkv + row0 * 3 * c + hd * d, *k = q + c, *v = q + 2 * c;
            const float *g = dy + row0 * c + hd * d, *l = lse + ((size_t)b * h + hd) * t;
            float *dq = dqkv + row0 * 3 * c + hd * d, *dk = dq + c, *dv = dq + 2 * c;
            mm(0, 1, t, t, d, scale, q, 3 * c, k, 3 * c, 0.0f, p, t);
            for (int i = 0; i < t; i++) {
                float *r = p + (size_t)i * t;
                for (int j = 0; j <= i; j++) r[j] = fast_exp(r[j] - l[i]);
                for (int j = i + 1; j < t; j++) r[j] = 0.0f;
            }
            mm(0, 1, t, t, d, 1.0f, g, c, v, 3 * c, 0.0f, dp, t);  /* dP = dY V^T */
            mm(1, 0, t, d, t, 1.0f, p, t, g, c, 0.0f, dv, 3 * c);  /* dV = P^T dY */
            for (int i = 0; i < t; i++) {  /* dS = P * (dP - rowsum(P * dP)) * scale */
                float *pr = p + (size_t)i * t, *dr = dp + (size_t)i * t, dot = 0.0f;
                for (int j = 0; j <= i; j++) dot += pr[j] * dr[j];
                for (int j = 0; j <= i; j++) dr[j] = pr[j] * (dr[j] - dot) * scale;
                for (int j = i + 1; j < t; j++) dr[j] = 0.0f;
            }
            mm(0, 0, t, d, t, 1.0f, dp, t, k, 3 * c, 0.0f, dq, 3 * c);  /* dQ = dS K */
            mm(1, 0, t, d, t, 1.0f, dp, t, q, 3 * c, 0.0f, dk, 3 * c);  /* dK = dS^T Q */
        }
    }
}

/* ------------------------------------------------------------------ workspace */

typedef struct {
    float *res, *ln1, *mean1, *rstd1, *qkv, *lse, *atty, *mid, *ln2, *mean2, *rstd2, *fch, *gel;
} layer_acts;

typedef struct {
    layer_acts layer;   /* layer 0's; layer l's are at + l * per_layer */
    size_t per_layer;   /* floats per layer */
    float *final_res, *lnf, *meanf, *rstdf;
    float *dres, *dln, *dqkv, *datty, *dfch, *drop, *p, *dp, *logits;
    int chunk_rows;     /* rows of logits made at a time */
} workspace;

static size_t ce_chunk_rows(int v, size_t n) {
    size_t rows = ((size_t)1 << 22) / (size_t)v;  /* 16 MB of logits at a time */
    if (rows < 1) rows = 1;
    return rows < n ? rows : n;
}

/* The dropout mask of `site` for n elements from global element `first` (1 kept, 0 dropped),
 * as the pass draws it: for tests that rebuild the pass elsewhere. */
void gpt_dropout_mask(float *out, size_t n, uint32_t seed, uint32_t site, uint64_t first,
                      float rate) {
    gpt_piece pc = {seed, 0};
    for (size_t i = 0; i < n; i++) out[i] = 1.0f;
    dropout(out, out, n, &pc, site, first, rate);
    for (size_t i = 0; i < n; i++) out[i] = out[i] != 0.0f ? 1.0f : 0.0f;
}

/* Floats of workspace a call with b_rows x t tokens needs. */
size_t gpt_workspace_floats(const gpt_dims *d, int b_rows, int t) {
    size_t n = (size_t)b_rows * t, c = d->C, f = d->F;
    size_t per_layer = n * (c + c + 3 * c + c + c + c + 2 * f) + 4 * n + (size_t)b_rows * d->H * t;
    size_t rest = n * (2 * c) + 2 * n + n * (c + c + 3 * c + c + f + c) + 2 * (size_t)t * t +
                  ce_chunk_rows(d->V, n) * d->V;
    return per_layer * d->L + rest;
}

static workspace carve(const gpt_dims *d, float *w, int b_rows, int t) {
    size_t n = (size_t)b_rows * t, c = d->C, f = d->F;
    workspace s;
    float *at = w;
#define TAKE(field, count) (field = at, at += (count))
    TAKE(s.layer.res, n * c);
    TAKE(s.layer.ln1, n * c);
    TAKE(s.layer.mean1, n);
    TAKE(s.layer.rstd1, n);
    TAKE(s.layer.qkv, n * 3 * c);
    TAKE(s.layer.lse, (size_t)b_rows * d->H * t);
    TAKE(s.layer.atty, n * c);
    TAKE(s.layer.mid, n * c);
    TAKE(s.layer.ln2, n * c);
    TAKE(s.layer.mean2, n);
    TAKE(s.layer.rstd2, n);
    TAKE(s.layer.fch, n * f);
    TAKE(s.layer.gel, n * f);
    s.per_layer = (size_t)(at - w);
    at = w + s.per_layer * d->L;
    TAKE(s.final_res, n * c);
    TAKE(s.lnf, n * c);
    TAKE(s.meanf, n);
    TAKE(s.rstdf, n);
    TAKE(s.dres, n * c);
    TAKE(s.dln, n * c);
    TAKE(s.dqkv, n * 3 * c);
    TAKE(s.datty, n * c);
    TAKE(s.dfch, n * f);
    TAKE(s.drop, n * c);
    TAKE(s.p, (size_t)t * t);
    TAKE(s.dp, (size_t)t * t);
    s.chunk_rows = (int)ce_chunk_rows(d->V, n);
    TAKE(s.logits, (size_t)s.chunk_rows * d->V);
#undef TAKE
    return s;
}

static layer_acts layer_at(const workspace *s, int l) {
    size_t o = s->per_layer * l;
    layer_acts a = s->layer;
    float **f = (float **)&a;
    for (size_t i = 0; i < sizeof(layer_acts) / sizeof(float *); i++) f[i] += o;
    return a;
}

/* out = res + dropout(x @ W^T + b) (C wide; dropout at `site` when the rate is > 0; scratch:
 * (n, C) floats). Without dropout the product adds straight onto the residual. */
static void residual_branch(float *out, const float *res, const float *x, const float *w,
                            const float *b, size_t n, int in, int c, float *scratch,
                            const gpt_piece *pc, uint32_t site, uint64_t first, float rate) {
    if (rate > 0.0f) {
        linear(scratch, x, w, b, n, in, c);
        dropout(scratch, scratch, n * c, pc, site, first, rate);
        add_arrays(out, res, scratch, n * c);
    } else {
        memcpy(out, res, sizeof(float) * n * c);
        add_rows(out, b, n, c);
        mm(0, 1, n, c, in, 1.0f, x, in, w, in, 1.0f, out, c);
    }
}

/* The gradient reaching a residual branch's product: dres through the branch's dropout mask
 * (into scratch), or dres itself without dropout. */
static const float *branch_gradient(const float *dres, size_t n, float *scratch,
                                    const gpt_piece *pc, uint32_t site, uint64_t first,
                                    float rate) {
    if (rate <= 0.0f) return dres;
    dropout(scratch, dres, n, pc, site, first, rate);
    return scratch;
}

/* ------------------------------------------------------------------ the pass */

void gpt_set_sgemm(sgemm_fn f) { gemm = f; }

/* Forward (and, when grads is not NULL, backward) over inputs/targets (b_rows, t). weights
 * (b_rows * t) says how much each position's cross-entropy counts (NULL: 1 each); piece places
 * the rows for dropout's masks (d->dropout > 0). Returns the weighted sum of cross-entropies;
 * *count gets the sum of the weights. */
double gpt_forward_backward(const gpt_dims *d, float *const *params, float *const *grads,
                            const int32_t *inputs, const int32_t *targets, const float *weights,
                            int b_rows, int t, const gpt_piece *piece, float *work,
                            double *count) {
    const int C = d->C, F = d->F, V = d->V, L = d->L, H = d->H;
    const size_t n = (size_t)b_rows * t;
    workspace s = carve(d, work, b_rows, t);
    const float *wte = params[0], *wpe = params[1];
    float *const *lp = params + 2;
    const float *lnf_w = params[2 + PARAMS_PER_LAYER * L], *lnf_b = params[3 + PARAMS_PER_LAYER * L];
    const float *head = d->tied ? wte : params[4 + PARAMS_PER_LAYER * L];

    /* forward */
    for (size_t i = 0; i < n; i++) {
        const float *e = wte + (size_t)inputs[i] * C, *pe = wpe + (size_t)(i % t) * C;
        float *x = s.layer.res + i * C;
        for (int j = 0; j < C; j++) x[j] = e[j] + pe[j];
    }
    const float rate = d->dropout;
    const uint64_t first = (uint64_t)piece->row0 * t * C;  /* the piece's first element */
    if (rate > 0.0f) dropout(s.layer.res, s.layer.res, n * C, piece, 0, first, rate);
    for (int l = 0; l < L; l++) {
        layer_acts a = layer_at(&s, l);
        float *const *w = lp + PARAMS_PER_LAYER * l;
        float *out = l + 1 < L ? layer_at(&s, l + 1).res : s.final_res;
        layernorm(a.ln1, a.mean1, a.rstd1, a.res, w[LN1_W], w[LN1_B], n, C, d->eps);
        linear(a.qkv, a.ln1, w[ATTN_W], w[ATTN_B], n, C, 3 * C);
        attention(a.atty, a.lse, a.qkv, s.p, b_rows, t, C, H);
        residual_branch(a.mid, a.res, a.atty, w[APROJ_W], w[APROJ_B], n, C, C, s.drop, piece,
                        1 + 2 * l, first, rate);
        layernorm(a.ln2, a.mean2, a.rstd2, a.mid, w[LN2_W], w[LN2_B], n, C, d->eps);
        linear(a.fch, a.ln2, w[FC_W], w[FC_B], n, C, F);
        gelu(a.gel, a.fch, n * F, d->gelu_tanh);
        residual_branch(out, a.mid, a.gel, w[MPROJ_W], w[MPROJ_B], n, F, C, s.drop, piece,
                        2 + 2 * l, first, rate);
    }
    layernorm(s.lnf, s.meanf, s.rstdf, s.final_res, lnf_w, lnf_b, n, C, d->eps);

    /* loss, and d loss / d lnf into dln, a chunk of rows at a time */
    double loss = 0.0, counted = 0.0;
    for (size_t r0 = 0; r0 < n; r0 += s.chunk_rows) {
        int rows = (int)(n - r0 < (size_t)s.chunk_rows ? n - r0 : (size_t)s.chunk_rows);
        mm(0, 1, rows, V, C, 1.0f, s.lnf + r0 * C, C, head, C, 0.0f, s.logits, V);
        for (int i = 0; i < rows; i++) {
            float *z = s.logits + (size_t)i * V, m = z[0], sum = 0.0f;
            float wgt = weights ? weights[r0 + i] : 1.0f;
            int tg = targets[r0 + i];
            for (int j = 1; j < V; j++) m = z[j] > m ? z[j] : m;
            for (int j = 0; j < V; j++) sum += fast_exp(z[j] - m);
            float lse = m + logf(sum);
            loss += (double)wgt * (lse - z[tg]);
            counted += wgt;
            if (grads) {  /* d ce / d z = softmax - onehot, times the position's weight */
                for (int j = 0; j < V; j++) z[j] = wgt * fast_exp(z[j] - lse);
                z[tg] -= wgt;
            }
        }
        if (grads) {
            float *dhead = d->tied ? grads[0] : grads[4 + PARAMS_PER_LAYER * L];
            mm(0, 0, rows, C, V, 1.0f, s.logits, V, head, C, 0.0f, s.dln + r0 * C, C);
            mm(1, 0, V, C, rows, 1.0f, s.logits, V, s.lnf + r0 * C, C, 1.0f, dhead, C);
        }
    }
    *count = counted;
    if (!grads) return loss;

    /* backward */
    float *const *gl = grads + 2;
    memset(s.dres, 0, sizeof(float) * n * C);
    layernorm_backward(s.dres, grads[2 + PARAMS_PER_LAYER * L], grads[3 + PARAMS_PER_LAYER * L],
                       s.dln, s.final_res, s.meanf, s.rstdf, lnf_w, n, C);
    for (int l = L - 1; l >= 0; l--) {
        layer_acts a = layer_at(&s, l);
        float *const *w = lp + PARAMS_PER_LAYER * l, *const *g = gl + PARAMS_PER_LAYER * l;
        /* out = mid + dropout(gel @ Wm^T + bm); the residual passes dres on unchanged */
        const float *dm = branch_gradient(s.dres, n * C, s.drop, piece, 2 + 2 * l, first, rate);
        linear_backward(s.dfch, g[MPROJ_W], g[MPROJ_B], dm, a.gel, w[MPROJ_W], n, F, C);
        gelu_backward(s.dfch, a.fch, n * F, d->gelu_tanh);
        linear_backward(s.dln, g[FC_W], g[FC_B], s.dfch, a.ln2, w[FC_W], n, C, F);
        layernorm_backward(s.dres, g[LN2_W], g[LN2_B], s.dln, a.mid, a.mean2, a.rstd2, w[LN2_W],
                           n, C);
        /* mid = res + dropout(atty @ Wp^T + bp) */
        const float *da = branch_gradient(s.dres, n * C, s.drop, piece, 1 + 2 * l, first, rate);
        linear_backward(s.datty, g[APROJ_W], g[APROJ_B], da, a.atty, w[APROJ_W], n, C, C);
        attention_backward(s.dqkv, s.datty, a.qkv, a.lse, s.p, s.dp, b_rows, t, C, H);
        linear_backward(s.dln, g[ATTN_W], g[ATTN_B], s.dqkv, a.ln1, w[ATTN_W], n, C, 3 * C);
        layernorm_backward(s.dres, g[LN1_W], g[LN1_B], s.dln, a.res, a.mean1, a.rstd1, w[LN1_W],
                           n, C);
    }
    if (rate > 0.0f) dropout(s.dres, s.dres, n * C, piece, 0, first, rate);
    for (size_t i = 0; i < n; i++) {  /* embeddings: scatter-add */
        float *de = grads[0] + (size_t)inputs[i] * C, *dpe = grads[1] + (size_t)(i % t) * C;
        const float *gi = s.dres + i * C;
        for (int j = 0; j < C; j++) {
            de[j] += gi[j];
            dpe[j] += gi[j];
        }
    }
    return loss;
}

/* ------------------------------------------------------------------ the update */

/* Sum of squares of x * scale, in 16 float lanes (vectorised) added up in double. */
static double sum_squares(const float *x, size_t n, float scale) {
    float lane[16] = {0};
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) lane[j] += (x[i + j] * scale) * (x[i + j] * scale);
    double total = 0.0;
    for (int j = 0; j < 16; j++) total += lane[j];
    for (; i < n; i++) total += (double)(x[i] * scale) * (x[i] * scale);
    return total;
}

static void adamw_tensor(size_t size, const float *restrict p0, const float *restrict m0,
                         const float *restrict v0, const float *restrict g0, float *restrict p1,
                         float *restrict m1, float *restrict v1, float g_scale, float keep,
                         float b1, float b2, float eps, float c1, float c2) {
    for (size_t j = 0; j < size; j++) {
        float g = g0[j] * g_scale;
        float mj = b1 * m0[j] + (1.0f - b1) * g;
        float vj = b2 * v0[j] + (1.0f - b2) * (g * g);
        m1[j] = mj;
        v1[j] = vj;
        p1[j] = p0[j] * keep - (c1 * mj) / (sqrtf(vj) * c2 + eps);
    }
}

/* One AdamW step over `count` tensors, in MLX's order of operations (bias-corrected, as
 * PyTorch's): g = grad * inv_n, clipped to a total norm of `clip` (when > 0); p *= 1 - lr * wd
 * (wd only where decay[i]); m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
 * p -= c1 m / (sqrt(v) c2 + eps) with c1 = lr / (1 - b1^t), c2 = 1 / sqrt(1 - b2^t).
 * grad is flat (the tensors one after another); the new p, m and v go to the flat out_*.
 * Returns the norm of g before clipping. */
double gpt_adamw(int count, const int64_t *sizes, const int32_t *decay,
                 const float *const *param, const float *const *m, const float *const *v,
                 const float *grad, float inv_n, float clip, float lr, float wd, float b1,
                 float b2, float eps, float c1, float c2, float *out_p, float *out_m,
                 float *out_v) {
    size_t total = 0;
    for (int i = 0; i < count; i++) total += (size_t)sizes[i];
    double norm = sqrt(sum_squares(grad, total, inv_n));
    float scale = 1.0f;
    if (clip > 0.0f) {
        scale = clip / ((float)norm + 1e-6f);
        scale = scale < 1.0f ? scale : 1.0f;
    }
    size_t at = 0;
    for (int i = 0; i < count; i++) {
        adamw_tensor((size_t)sizes[i], param[i], m[i], v[i], grad + at, out_p + at, out_m + at,
                     out_v + at, inv_n * scale, 1.0f - lr * (decay[i] ? wd : 0.0f), b1, b2, eps,
                     c1, c2);
        at += (size_t)sizes[i];
    }
    return norm;
}
