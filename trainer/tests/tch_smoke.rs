//! libtorch is linked, found at run time through the rpath (no LD_LIBRARY_PATH), and
//! computes: a tensor op and a gradient, checked against values worked out by hand.

use tch::{Device, Kind, Tensor};

#[test]
fn matmul_and_autograd() {
    let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).reshape([2, 2]);
    let b = Tensor::from_slice(&[5.0f32, 6.0, 7.0, 8.0]).reshape([2, 2]);
    let c = a.matmul(&b);
    assert_eq!(Vec::<f32>::try_from(c.flatten(0, 1)).unwrap(), vec![19.0, 22.0, 43.0, 50.0]);

    // d/dx sum(x^3 + 2x) = 3x^2 + 2
    let x = Tensor::from_slice(&[-1.0f64, 0.5, 2.0]).set_requires_grad(true);
    let y = (x.pow_tensor_scalar(3) + &x * 2.0).sum(Kind::Double);
    y.backward();
    let grad = Vec::<f64>::try_from(x.grad()).unwrap();
    assert_eq!(grad, vec![5.0, 2.75, 14.0]);
}

#[test]
fn cpu_device_resolves_and_cuda_errors_clearly_without_a_gpu() {
    use alignx_trainer::device::{DeviceChoice, resolve};
    assert_eq!(resolve(DeviceChoice::Cpu).unwrap(), Device::Cpu);
    match resolve(DeviceChoice::Cuda) {
        Ok(d) => assert!(tch::Cuda::is_available(), "resolved {d:?} without CUDA"),
        Err(e) => assert!(e.to_string().contains("CUDA is not available"), "{e}"),
    }
    let auto = resolve(DeviceChoice::Auto).unwrap();
    assert_eq!(auto.is_cuda(), tch::Cuda::is_available());
}

/// On a GPU machine (`ALIGNX_EXPECT_CUDA=1`), `--device cuda` must resolve and compute
/// what the CPU computes. Elsewhere this checks nothing beyond the test above.
#[test]
fn cuda_matches_cpu_when_a_gpu_is_expected() {
    use alignx_trainer::device::{DeviceChoice, resolve};
    if std::env::var("ALIGNX_EXPECT_CUDA").as_deref() != Ok("1") {
        return;
    }
    let device = resolve(DeviceChoice::Cuda).expect("ALIGNX_EXPECT_CUDA=1 but CUDA did not resolve");
    assert!(device.is_cuda());
    let x = Tensor::randn([64, 128], (Kind::Float, Device::Cpu));
    let w = Tensor::randn([128, 32], (Kind::Float, Device::Cpu));
    let cpu = x.matmul(&w).softmax(-1, Kind::Float);
    let gpu =
        x.to_device(device).matmul(&w.to_device(device)).softmax(-1, Kind::Float).to_device(Device::Cpu);
    let diff = (cpu - gpu).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "CPU and CUDA differ by {diff}");
}
