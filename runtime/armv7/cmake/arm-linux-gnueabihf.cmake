# CMake toolchain file: cross-compile for ARMv7-A hard-float Linux (armhf) with Debian's
# gcc-arm-linux-gnueabihf / g++-arm-linux-gnueabihf. The Debian cross packages install their
# sysroot (libc, libstdc++ for armhf) under /usr/arm-linux-gnueabihf.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR armv7l)

set(_triple arm-linux-gnueabihf)
set(CMAKE_C_COMPILER ${_triple}-gcc)
set(CMAKE_CXX_COMPILER ${_triple}-g++)

# Same ISA as the artifacts edgeloop compiles for armv7 profiles (TVM target
# mtriple armv7a-linux-gnueabihf, +neon, +vfp4, hard-float ABI).
set(CMAKE_C_FLAGS_INIT "-march=armv7-a -mfpu=neon-vfpv4 -mfloat-abi=hard")
set(CMAKE_CXX_FLAGS_INIT "-march=armv7-a -mfpu=neon-vfpv4 -mfloat-abi=hard")

set(CMAKE_FIND_ROOT_PATH /usr/${_triple})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# Lets try_run()/tests run the binaries under user-mode emulation on an x86_64 build host.
find_program(_qemu_arm qemu-arm-static)
if(_qemu_arm)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${_qemu_arm} -L /usr/${_triple})
endif()
