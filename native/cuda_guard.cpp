// A no-op device guard for the CUDA device type: "cuda" on the robot is rrto's virtual device.
//
// torch's C++ opens a device guard around many Python entry points (indexing,
// tensor construction) before any operator is dispatched. A CPU-only build has no
// CUDA guard registered, so those entry points fail on rrto's virtual cuda tensors
// with "PyTorch is not linked with support for cuda devices". This guard answers as
// a machine with one GPU whose device 0 is always current; the operators themselves
// never reach a CUDA kernel, because rrto intercepts them at the Python dispatch key.
// A build with CUDA (pip's default torch, a Jetson's) has a real guard, which asks the
// driver: on a robot without a GPU that fails, and with one it would open a CUDA context
// for nothing. It is set aside while rrto is on and put back after.
#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace {
using c10::Device;
using c10::DeviceIndex;
using c10::DeviceType;
using c10::Stream;

struct VirtualCudaGuard final : public c10::impl::DeviceGuardImplInterface {
  DeviceType type() const override { return DeviceType::CUDA; }
  Device exchangeDevice(Device) const override { return Device(DeviceType::CUDA, 0); }
  Device getDevice() const override { return Device(DeviceType::CUDA, 0); }
  void setDevice(Device) const override {}
  void uncheckedSetDevice(Device) const noexcept override {}
  Stream getStream(Device d) const noexcept override { return Stream(Stream::DEFAULT, Device(DeviceType::CUDA, 0)); }
  Stream exchangeStream(Stream s) const noexcept override { return s; }
  DeviceIndex deviceCount() const noexcept override { return 1; }
  void record(void**, const Stream&, const DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  void destroyEvent(void*, const DeviceIndex) const noexcept override {}
};

VirtualCudaGuard guard;
}  // namespace

static const c10::impl::DeviceGuardImplInterface* real = nullptr;  // a CUDA build's own guard

extern "C" int rrto_register_cuda_guard(void) {
  auto& slot = c10::impl::device_guard_impl_registry[static_cast<size_t>(DeviceType::CUDA)];
  const c10::impl::DeviceGuardImplInterface* before = slot.exchange(&guard);
  if (before != &guard) {
    real = before;
  }
  return real != nullptr;  // 1: a CUDA build's guard was set aside
}

extern "C" void rrto_unregister_cuda_guard(void) {
  auto& slot = c10::impl::device_guard_impl_registry[static_cast<size_t>(DeviceType::CUDA)];
  const c10::impl::DeviceGuardImplInterface* mine = &guard;
  slot.compare_exchange_strong(mine, real);
}
