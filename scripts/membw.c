// Sequential read bandwidth of this machine, one and two threads, over a
// buffer of N MiB (default 256): the bound single-stream decode meets.
//   cc -O2 -mavx2 -pthread scripts/membw.c -o /tmp/membw && /tmp/membw
// (docs/benchmarks.md, "Repacked kernels"; edit N for 30 or 80 MiB).
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <string.h>
#include <pthread.h>
#define N (256UL<<20)
static char *buf;
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static void* run(void*a){ size_t off=(size_t)a; __m256i acc=_mm256_setzero_si256(); for(int rep=0;rep<4;rep++) for(size_t i=off;i<off+N/2;i+=32) acc=_mm256_add_epi8(acc,_mm256_load_si256((__m256i*)(buf+i))); volatile int x=_mm256_extract_epi32(acc,0); return 0;}
int main(){ buf=aligned_alloc(64,N); memset(buf,1,N);
 double t=now(); run(0); double e=now()-t; printf("1 thread: %.2f GB/s\n", 4.0*N/2/e/1e9);
 pthread_t a,b; t=now(); pthread_create(&a,0,run,(void*)0); pthread_create(&b,0,run,(void*)(N/2)); pthread_join(a,0); pthread_join(b,0); e=now()-t; printf("2 threads: %.2f GB/s\n", 8.0*N/2/e/1e9);}
