// A caching CPU allocator for large blocks, installed on request
// (bagnet_fast.enable_cpu_caching_allocator; bagnet_fast/executors/cpu_memory.py says why).
//
// What glibc does with a BagNet training step: every block above its mmap threshold (at most
// 32 MiB) is mapped on allocation and unmapped on free, so each 95 MiB activation of a BagNet-33
// step at batch 8 is page-faulted and zeroed anew (4 KiB faults); smaller blocks come from the
// heap, which cannot hand back what fragmentation pins. This allocator keeps freed blocks of
// >= 1 MiB by their size and hands them out again to requests of the same size (a training step
// asks for the same sizes in the same order every step), maps new ones 2 MiB-aligned with
// MADV_HUGEPAGE when asked (2 MiB faults), and bounds what it keeps: a miss first unmaps the
// least recently freed blocks until live + cached bytes stay within the largest live total seen,
// so the resident memory of its blocks never exceeds the high-water mark of live blocks.
//
// Once installed it stays installed for the life of the process: oneDNN (ideep) frees its
// buffers through whatever CPU allocator is current, so a block mapped here must be freed here.
// Disabling stops caching and mapping; blocks of the system allocator are freed with it.
#include <Python.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>
#include <sys/mman.h>

#include <cstdint>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace bagnet_fast {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;   // smaller blocks: glibc's bins reuse them already
constexpr size_t kHugePage = size_t(2) << 20;   // x86-64 transparent huge page
constexpr size_t kPage = size_t(4) << 10;

struct FreeBlock {
  void* ptr;
  size_t size;
};

class CachingCPUAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* ptr = n >= kMinBytes ? allocate_large(n) : nullptr;
    if (ptr == nullptr) {  // small, or caching off: what c10's default CPU allocator does
      ptr = c10::alloc_cpu(n);
      c10::profiledCPUMemoryReporter().New(ptr, n);
    }
    return {ptr, ptr, &Delete, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &Delete; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static void Delete(void* ptr);

  // fork() while another thread holds the lock (an intra-op thread allocating) would leave it
  // held forever in the child (a DataLoader worker): hold it across fork, release it on both sides.
  void lock_for_fork() { mutex_.lock(); }
  void unlock_after_fork() { mutex_.unlock(); }

  void set_enabled(bool enabled, bool huge_pages) {
    std::lock_guard<std::mutex> lock(mutex_);
    enabled_ = enabled;
    huge_pages_ = huge_pages;
    if (!enabled) release_cached_locked();
  }

  size_t empty_cache() {
    std::lock_guard<std::mutex> lock(mutex_);
    return release_cached_locked();
  }

  void reset_peak() {  // the statistic only: the bound of the cache stays the high-water mark
    std::lock_guard<std::mutex> lock(mutex_);
    peak_live_ = live_;
  }

  PyObject* stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return Py_BuildValue("{s:O,s:O,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "enabled", enabled_ ? Py_True : Py_False,
                         "huge_pages", huge_pages_ ? Py_True : Py_False, "live_bytes", (unsigned long long)live_,
                         "cached_bytes", (unsigned long long)cached_, "peak_live_bytes",
                         (unsigned long long)peak_live_, "hits", (unsigned long long)hits_, "misses",
                         (unsigned long long)misses_, "evictions", (unsigned long long)evictions_,
                         "min_block_bytes", (unsigned long long)kMinBytes,
                         "bound_bytes", (unsigned long long)bound_);
  }

 private:
  void* allocate_large(size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!enabled_) return nullptr;
    const size_t granule = huge_pages_ ? kHugePage : kPage;
    const size_t size = (n + granule - 1) / granule * granule;
    // Hit: the most recently freed block of the smallest cached size in [size, size * 5/4]
    // (a block is never split; what it has beyond the request counts as live).
    // Bins are erased when they empty, so the first bin in range has a block.
    auto bin = by_size_.lower_bound(size);
    if (bin != by_size_.end() && bin->first <= size + size / 4) {
      auto it = bin->second.back();
      bin->second.pop_back();
      void* ptr = it->ptr;
      const size_t block = it->size;
      lru_.erase(it);
      if (bin->second.empty()) by_size_.erase(bin);  // no empty bins to walk past later
      cached_ -= block;
      return track_locked(ptr, block, /*hit=*/true);
    }
    // Miss: keep live + cached within the high-water mark of live bytes.
    bound_ = std::max(bound_, live_ + size);
    while (!lru_.empty() && live_ + cached_ + size > bound_) evict_oldest_locked();
    void* ptr = map(size);
    if (ptr == nullptr) {  // out of address space or memory: drop the cache and try once more
      release_cached_locked();
      ptr = map(size);
    }
    if (ptr == nullptr) {
      TORCH_CHECK_WITH(OutOfMemoryError, false, "bagnet_fast CPU caching allocator: cannot map ", size,
                       " bytes (", live_, " bytes live)");
    }
    return track_locked(ptr, size, /*hit=*/false);
  }

  void* track_locked(void* ptr, size_t size, bool hit) {
    live_blocks_[ptr] = size;
    live_ += size;
    peak_live_ = std::max(peak_live_, live_);
    (hit ? hits_ : misses_) += 1;
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(ptr, static_cast<int64_t>(size), live_, live_ + cached_,
                                       c10::Device(c10::DeviceType::CPU));
    return ptr;
  }

  void* map(size_t size) {
    if (!huge_pages_) {
      void* ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      return ptr == MAP_FAILED ? nullptr : ptr;
    }
    // 2 MiB-aligned, so that the kernel can back the block with huge pages.
    void* raw = mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    const auto start = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (start + kHugePage - 1) & ~(kHugePage - 1);
    if (aligned > start) munmap(raw, aligned - start);
    const uintptr_t tail = start + size + kHugePage - (aligned + size);
    if (tail > 0) munmap(reinterpret_cast<void*>(aligned + size), tail);
    madvise(reinterpret_cast<void*>(aligned), size, MADV_HUGEPAGE);  // advice: failure is harmless
    return reinterpret_cast<void*>(aligned);
  }

  void evict_oldest_locked() {
    FreeBlock block = lru_.front();
    auto found = by_size_.find(block.size);
    auto& bin = found->second;
    for (auto it = bin.begin(); it != bin.end(); ++it) {
      if ((*it)->ptr == block.ptr) {
        bin.erase(it);
        break;
      }
    }
    if (bin.empty()) by_size_.erase(found);
    lru_.pop_front();
    munmap(block.ptr, block.size);
    cached_ -= block.size;
    evictions_ += 1;
  }

  size_t release_cached_locked() {
    size_t released = 0;
    while (!lru_.empty()) {
      released += lru_.front().size;
      evict_oldest_locked();
    }
    return released;
  }

  // Returns false when ptr is not one of this allocator's blocks.
  bool release(void* ptr) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = live_blocks_.find(ptr);
    if (found == live_blocks_.end()) return false;
    const size_t size = found->second;
    live_blocks_.erase(found);
    live_ -= size;
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(ptr, -static_cast<int64_t>(size), live_, live_ + cached_,
                                       c10::Device(c10::DeviceType::CPU));
    if (!enabled_) {
      munmap(ptr, size);
      return true;
    }
    lru_.push_back({ptr, size});
    by_size_[size].push_back(std::prev(lru_.end()));
    cached_ += size;
    return true;
  }

  std::mutex mutex_;
  bool enabled_ = false;
  bool huge_pages_ = true;
  std::unordered_map<void*, size_t> live_blocks_;
  std::list<FreeBlock> lru_;  // cached blocks, least recently freed first
  std::map<size_t, std::vector<std::list<FreeBlock>::iterator>> by_size_;
  size_t live_ = 0, cached_ = 0, peak_live_ = 0;
  size_t bound_ = 0;  // the high-water mark of live bytes: live + cached never exceed it
  uint64_t hits_ = 0, misses_ = 0, evictions_ = 0;
};

// Never destroyed: blocks may be freed during interpreter shutdown, after static destructors.
CachingCPUAllocator* instance() {
  static auto* allocator = new CachingCPUAllocator();
  return allocator;
}

void CachingCPUAllocator::Delete(void* ptr) {
  if (ptr == nullptr || instance()->release(ptr)) return;
  c10::profiledCPUMemoryReporter().Delete(ptr);  // a block of the system allocator
  c10::free_cpu(ptr);
}

bool installed = false;

}  // namespace

// cpu_caching_allocator_set(enabled: bool, huge_pages: bool) -> None: installs the allocator as
// torch's CPU allocator the first time it is enabled.
PyObject* cpu_caching_allocator_set(PyObject*, PyObject* args) {
  int enabled = 0, huge_pages = 1;
  if (!PyArg_ParseTuple(args, "pp", &enabled, &huge_pages)) return nullptr;
  instance()->set_enabled(enabled != 0, huge_pages != 0);
  if (enabled && !installed) {
    pthread_atfork([] { instance()->lock_for_fork(); }, [] { instance()->unlock_after_fork(); },
                   [] { instance()->unlock_after_fork(); });
    c10::SetCPUAllocator(instance(), /*priority=*/UINT8_MAX);
    installed = true;
  }
  Py_RETURN_NONE;
}

// cpu_caching_allocator_stats() -> dict (installed: whether torch's CPU allocator is this one).
PyObject* cpu_caching_allocator_stats(PyObject*, PyObject*) {
  PyObject* stats = instance()->stats();
  if (stats == nullptr) return nullptr;
  const bool current = c10::GetCPUAllocator() == instance();
  if (PyDict_SetItemString(stats, "installed", current ? Py_True : Py_False) < 0) {
    Py_DECREF(stats);
    return nullptr;
  }
  return stats;
}

// cpu_caching_allocator_empty_cache() -> int: bytes of cached blocks unmapped.
PyObject* cpu_caching_allocator_empty_cache(PyObject*, PyObject*) {
  return PyLong_FromSize_t(instance()->empty_cache());
}

// cpu_caching_allocator_reset_peak() -> None: the high-water mark restarts at the live bytes.
PyObject* cpu_caching_allocator_reset_peak(PyObject*, PyObject*) {
  instance()->reset_peak();
  Py_RETURN_NONE;
}

}  // namespace bagnet_fast
