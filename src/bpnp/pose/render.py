"""Headless rasterisation of a :class:`~bpnp.pose.mesh.Mesh` with OpenGL (moderngl over EGL).

The camera is OpenCV's pinhole camera: ``X_cam = R X + t``, pixel ``u = fx x/z + cx``, integer
pixel coordinates at pixel centres, rows from the top. The vertex shader applies exactly that
projection, so rendered silhouettes agree with :func:`bpnp.project` of the same pose (tested).
"""

from __future__ import annotations

import numpy as np

from .mesh import Mesh

__all__ = ["Renderer", "RenderUnavailableError", "Shading"]


class RenderUnavailableError(RuntimeError):
    """No OpenGL context could be created (no moderngl, or no EGL/GL driver)."""


_VERTEX = """
#version 330
uniform mat3 R;
uniform vec3 t;
uniform vec4 intrinsics;   // fx, fy, cx, cy (pixels, OpenCV convention)
uniform vec2 viewport;     // width, height of the target (pixels)
uniform vec2 clip;         // near, far (mm)
in vec3 in_pos;
in vec3 in_normal;
in vec2 in_uv;
in vec3 in_color;
out vec3 v_normal;
out vec3 v_cam;
out vec2 v_uv;
out vec3 v_color;
void main() {
    vec3 p = R * in_pos + t;
    float W = viewport.x, H = viewport.y, n = clip.x, f = clip.y;
    // OpenCV pixel u maps to NDC -1 + (2u + 1)/W; rows run down, GL's y runs up.
    float xc = 2.0 * intrinsics.x / W * p.x + ((2.0 * intrinsics.z + 1.0) / W - 1.0) * p.z;
    float yc = -2.0 * intrinsics.y / H * p.y + (1.0 - (2.0 * intrinsics.w + 1.0) / H) * p.z;
    float zc = (f + n) / (f - n) * p.z - 2.0 * f * n / (f - n);
    gl_Position = vec4(xc, yc, zc, p.z);
    v_normal = R * in_normal;
    v_cam = p;
    v_uv = in_uv;
    v_color = in_color;
}
"""

_FRAGMENT = """
#version 330
uniform sampler2D tex;
uniform bool use_texture;
uniform vec3 light_dir;    // towards the light, camera frame
uniform vec3 tint;
uniform float ambient;
uniform float diffuse;
uniform float specular;
in vec3 v_normal;
in vec3 v_cam;
in vec2 v_uv;
in vec3 v_color;
out vec4 frag;
void main() {
    vec3 nrm = normalize(v_normal);
    vec3 view = normalize(-v_cam);
    if (dot(nrm, view) < 0.0) nrm = -nrm;   // two-sided: meshes with flipped faces still shade
    vec3 base = use_texture ? texture(tex, v_uv).rgb : v_color;
    float lambert = max(dot(nrm, light_dir), 0.0);
    float spec = pow(max(dot(reflect(-light_dir, nrm), view), 0.0), 24.0);
    vec3 rgb = base * tint * (ambient + diffuse * lambert) + specular * spec;
    frag = vec4(clamp(rgb, 0.0, 1.0), 1.0);
}
"""


class Shading:
    """Lighting and colour of one render: ``light_dir`` (3,) towards the light in the camera
    frame, ``tint`` (3,) multiplies the base colour, ``ambient``, ``diffuse``, ``specular``."""

    def __init__(
        self,
        light_dir=(0.0, 0.0, -1.0),
        tint=(1.0, 1.0, 1.0),
        ambient: float = 0.35,
        diffuse: float = 0.75,
        specular: float = 0.1,
    ) -> None:
        d = np.asarray(light_dir, dtype=np.float64)
        self.light_dir = d / np.linalg.norm(d)
        self.tint = np.asarray(tint, dtype=np.float64)
        self.ambient, self.diffuse, self.specular = float(ambient), float(diffuse), float(specular)


class Renderer:
    """Renders one mesh at any pose into RGB + mask images.

    Args:
        mesh: the object (mm). Untextured meshes without vertex colours are rendered light grey.
        width, height: image size (pixels).
        supersample: each pixel averages ``supersample**2`` samples (anti-aliasing).
    Raises:
        RenderUnavailableError: no OpenGL context (install the ``pose`` extra and Mesa's EGL:
            Debian ``libegl1 libegl-mesa0 libgl1-mesa-dri``).
    """

    def __init__(self, mesh: Mesh, width: int, height: int, supersample: int = 2) -> None:
        try:
            import moderngl
        except ImportError as exc:
            raise RenderUnavailableError("rendering needs moderngl: pip install 'bpnp[pose]'") from exc
        try:
            self.ctx = moderngl.create_standalone_context(backend="egl")
        except Exception as egl_error:  # noqa: BLE001 - any driver failure means: try the default
            try:
                self.ctx = moderngl.create_standalone_context()
            except Exception as exc:  # noqa: BLE001
                raise RenderUnavailableError(
                    f"no OpenGL context (EGL: {egl_error}; default: {exc}); on Debian install "
                    "libegl1 libegl-mesa0 libgl1-mesa-dri"
                ) from exc
        self.mesh = mesh
        self.width, self.height, self.ss = int(width), int(height), int(supersample)
        self.prog = self.ctx.program(vertex_shader=_VERTEX, fragment_shader=_FRAGMENT)
        V = len(mesh.vertices)
        uv = mesh.uv if mesh.uv is not None else np.zeros((V, 2))
        color = mesh.colors if mesh.colors is not None else np.full((V, 3), 0.8)
        data = np.concatenate([mesh.vertices, mesh.normals, uv, color], 1).astype("f4")
        vbo = self.ctx.buffer(data.tobytes())
        ibo = self.ctx.buffer(mesh.faces.astype("i4").tobytes())
        self.vao = self.ctx.vertex_array(
            self.prog, [(vbo, "3f 3f 2f 3f", "in_pos", "in_normal", "in_uv", "in_color")], index_buffer=ibo
        )
        self.use_texture = mesh.texture is not None
        if self.use_texture:
            # GL textures start at the bottom row; OBJ's v runs up: flip the image rows.
            image = np.ascontiguousarray(mesh.texture[::-1])
            self.texture = self.ctx.texture((image.shape[1], image.shape[0]), 3, image.tobytes())
            self.texture.build_mipmaps()
            self.texture.use(0)
            self.prog["tex"].value = 0
        W, H = self.width * self.ss, self.height * self.ss
        self.fbo = self.ctx.framebuffer(
            color_attachments=[self.ctx.renderbuffer((W, H), 4)], depth_attachment=self.ctx.depth_renderbuffer((W, H))
        )
        self.radius = float(np.linalg.norm(mesh.vertices, axis=1).max())

    def render(self, R: np.ndarray, t: np.ndarray, K: np.ndarray, shading: Shading | None = None):
        """Render the object at pose ``(R, t)`` seen by camera ``K``.

        Args:
            R: ``(3, 3)`` rotation; t: ``(3,)`` translation (mm); K: ``(3, 3)`` camera matrix.
            shading: lighting and colour (default: a head light).
        Returns:
            ``(rgb, coverage)``: ``(H, W, 3)`` uint8 object colours (black background) and
            ``(H, W)`` float32 object coverage in [0, 1] (the anti-aliased mask).
        """
        shading = shading or Shading()
        ss = self.ss
        depth = float(np.asarray(t, dtype=np.float64)[2])
        near = max(depth - 2 * self.radius, 1e-3 * max(depth, 1e-6), 1e-6)
        far = depth + 2 * self.radius
        prog = self.prog
        prog["R"].write(np.asarray(R, dtype="f4").T.tobytes())  # GLSL matrices are column-major
        prog["t"].value = tuple(float(v) for v in t)
        prog["intrinsics"].value = (K[0, 0] * ss, K[1, 1] * ss, (K[0, 2] + 0.5) * ss - 0.5, (K[1, 2] + 0.5) * ss - 0.5)
        prog["viewport"].value = (float(self.width * ss), float(self.height * ss))
        prog["clip"].value = (near, far)
        prog["use_texture"].value = self.use_texture
        prog["light_dir"].value = tuple(float(v) for v in shading.light_dir)
        prog["tint"].value = tuple(float(v) for v in shading.tint)
        prog["ambient"].value = shading.ambient
        prog["diffuse"].value = shading.diffuse
        prog["specular"].value = shading.specular
        self.fbo.use()
        self.ctx.enable(self.ctx.DEPTH_TEST)
        self.fbo.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
        self.vao.render()
        raw = np.frombuffer(self.fbo.read(components=4, dtype="f1"), dtype=np.uint8)
        img = raw.reshape(self.height * ss, self.width * ss, 4)[::-1].astype(np.float32) / 255.0
        img = img.reshape(self.height, ss, self.width, ss, 4).mean((1, 3))
        coverage = img[..., 3]
        # Premultiplied: dividing by coverage restores the object's colour at its edges.
        rgb = img[..., :3] / np.maximum(coverage, 1e-6)[..., None]
        rgb = np.where(coverage[..., None] > 0, rgb, 0.0)
        return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8), coverage

    def release(self) -> None:
        """Free the OpenGL objects and context."""
        self.ctx.release()
