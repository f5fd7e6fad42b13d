/* This x86-64 machine's fp32 arithmetic peak: the roofline that benchmarks/transformer_step.py's
 * matmul shares are read against.
 *
 * Each thread runs 12 independent chains of 8-wide fused multiply-adds (2 FLOP per lane). Twelve
 * chains cover the FMA latency (4 cycles) times the FMA pipes (2 on Zen 4 and recent Intel), so
 * the loop issues one FMA per pipe per cycle and its rate is the peak, with no memory traffic.
 *
 *     gcc -O3 -march=native -fopenmp benchmarks/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

#define CHAINS 12

int main(void) {
    const long iterations = 1000000000L;  /* about 2 s */
    float sink = 0;
    double start = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
    {
        __m256 acc[CHAINS];
        const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_set1_ps((float)c);
        for (long n = 0; n < iterations; n++)
            for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_fmadd_ps(acc[c], a, b);
        float lanes[8];
        for (int c = 0; c < CHAINS; c++) {  /* use the results, so that nothing is optimised away */
            _mm256_storeu_ps(lanes, acc[c]);
            sink += lanes[0];
        }
    }
    double seconds = omp_get_wtime() - start;
    int threads = omp_get_max_threads();
    double flops = 2.0 * 8 * CHAINS * (double)iterations * threads;
    printf("fp32 FMA peak: %.0f GFLOP/s on %d threads (%.1f s; checksum %g)\n", flops / seconds / 1e9, threads, seconds, sink);
    return 0;
}
