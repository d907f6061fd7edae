#[clouds::service("svc")]
pub trait Svc {
    async fn borrow(&self, text: std::borrow::Cow<'_, str>) -> Box<Self>;
}

fn main() {}
