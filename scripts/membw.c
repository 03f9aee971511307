// Sequential read bandwidth of this machine over a working set of N MiB
// (first argument, default 256), read whole four times by one thread, then
// split between two threads: the bound single-stream decode meets, and the
// size past which a working set stops fitting this VM's share of the L3.
//   cc -O2 -mavx2 -pthread scripts/membw.c -o /tmp/membw && /tmp/membw 100
//   for n in 16 48 80 100 120 160 240; do /tmp/membw $n; done
// (docs/benchmarks.md, "Repacked kernels" and "Where an 8-sequence step
// goes").
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define REPS 4
static size_t N;
static char *buf;
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
struct part { size_t off, len; };
static void *run(void *a) {
  struct part *p = a;
  __m256i acc = _mm256_setzero_si256();
  for (int rep = 0; rep < REPS; rep++)
    for (size_t i = p->off; i < p->off + p->len; i += 32)
      acc = _mm256_add_epi8(acc, _mm256_load_si256((__m256i *)(buf + i)));
  volatile int x = _mm256_extract_epi32(acc, 0);
  (void)x;
  return 0;
}
int main(int argc, char **argv) {
  N = (size_t)(argc > 1 ? atoi(argv[1]) : 256) << 20;
  buf = aligned_alloc(64, N);
  memset(buf, 1, N);
  struct part whole = {0, N}, a = {0, N / 2}, b = {N / 2, N / 2};
  run(&whole); // warm: the pages are touched, the caches hold what they keep
  double t = now();
  run(&whole);
  double e1 = now() - t;
  pthread_t ta, tb;
  t = now();
  pthread_create(&ta, 0, run, &a);
  pthread_create(&tb, 0, run, &b);
  pthread_join(ta, 0);
  pthread_join(tb, 0);
  double e2 = now() - t;
  printf("%zu MiB: 1 thread %.2f GB/s, 2 threads %.2f GB/s\n", N >> 20,
         (double)REPS * N / e1 / 1e9, (double)REPS * N / e2 / 1e9);
  return 0;
}
